"""Verification of a model artifact outside the serving process: one component, one entry point.

Native parsers can crash a process on a corrupt file, so every new artifact is first read, parsed and
checked (schema, warm-up predictions, LightGBM's fast-path equality check) in a separate short-lived
process, `python -m tabserve_server.core.verify DIRECTORY`. `verify()` runs it and returns its `Verdict`,
whose digest names the bytes that passed; a crash, a signal or running past the time limit there is a
`VerifierFailed` that says what happened in words, and the serving process is never touched.
"""

from tabserve_server.core.verify.process import Verdict, VerifyLimits, verify

__all__ = ["Verdict", "VerifyLimits", "verify"]
