"""Secrets from files (a mounted Kubernetes Secret) or the environment, never from flags (see settings.py)."""

from __future__ import annotations

from pathlib import Path

from tabserve_common.settings import SettingsError

__all__ = ["read_secret"]


def read_secret(value: str, path: str, what: str) -> str:
    """The secret: the content of `path` (trailing newline removed) when `path` is set, else `value` (which the
    settings took from the environment). Raises SettingsError when the file cannot be read or is empty."""
    if not path:
        return value
    try:
        text = Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise SettingsError(f"cannot read the {what} file {path}: {exc.strerror or exc}") from None
    if not text:
        raise SettingsError(f"the {what} file {path} is empty")
    return text
