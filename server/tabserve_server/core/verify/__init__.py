"""Verification of a model artifact outside the serving process: one component, one entry point.

Native parsers can crash a process on a corrupt file, so every new artifact is first read, parsed and
checked (schema, warm-up predictions, LightGBM's fast-path equality check) in a separate short-lived
process, `python -m tabserve_server.core.verify DIRECTORY`. `verify()` runs it and returns its `Verdict`,
whose digest names the bytes that passed; a crash, a signal or running past the time limit there is a
`VerifierFailed` that says what happened in words, and the serving process is never touched.
`Verifier` is what a serving process holds: it forks each verifier from a long-lived zygote
(`python -m tabserve_server.core.verify.fork_server`) that imported lightgbm once, and falls back to
`verify()` when the zygote is gone.
"""

from tabserve_server.core.verify.process import Verdict, VerifyLimits, verify
from tabserve_server.core.verify.verifier import Verifier

__all__ = ["Verdict", "Verifier", "VerifyLimits", "verify"]
