"""The loader's one entry point to verification: `Verifier.verify()`, through the zygote or a fresh process.

With `zygote`, each verification is a child forked by the verifier zygote (fork_server.py), which paid the
imports once; when the zygote fails, that verification runs in a fresh process (the spawn path, process.py)
and the zygote is restarted afterwards, so its import does not compete with the verification. Either way an
artifact is parsed in a disposable process and its end is judged by the same words (process.py `judge`).
"""

from __future__ import annotations

import time
from pathlib import Path

from tabserve_server.core.verify.process import Verdict, VerifyLimits, arguments, judge, verify
from tabserve_server.core.verify.zygote import Zygote


class Verifier:
    def __init__(self, limits: VerifyLimits, *, zygote: bool) -> None:
        self.limits = limits
        # A zygote that allows pyfunc keeps lightgbm's scikit-learn and pandas interfaces (slower, once).
        self.zygote = Zygote(lean=not limits.allow_pyfunc) if zygote else None

    def start(self) -> None:
        """Start the zygote now, so its imports are done before the first reload (else: at the first one)."""
        if self.zygote is not None:
            self.zygote.start()

    def verify(self, directory: Path, label: str) -> Verdict:
        """Check the model in `directory` in a disposable process; raise ModelLoadError (VerifierFailed) if unfit."""
        if self.zygote is None:
            return verify(directory, label, self.limits)
        started = time.monotonic()
        # Parent pid 0: the forked child checked its parent, the zygote, as it started (fork_server.py).
        ended = self.zygote.run(arguments(directory, label, self.limits, 0), self.limits.nice,
                                self.limits.timeout_seconds)
        if ended is not None:
            return judge(ended, label, self.limits, started)
        try:
            return verify(directory, label, self.limits)
        finally:
            self.zygote.start()

    def close(self) -> None:
        if self.zygote is not None:
            self.zygote.close()


__all__ = ["Verifier"]
