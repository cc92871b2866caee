"""Find a command from a Debian package, installing the package with apt-get when it is missing.

Tests and the benchmark need real third-party tools (promtool and prometheus from `prometheus`,
h2load from `nghttp2-client`, initdb and postgres from `postgresql`); a fresh machine or CI does not have them.
Some packages install their commands off PATH (PostgreSQL's under /usr/lib/postgresql/<version>/bin): the
caller names such directories as glob patterns, and the newest version is taken. Installs are serialised
with a lock file, because two apt-get runs at once fail on dpkg's own lock.
"""

from __future__ import annotations

import fcntl
import glob
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

INSTALL_TIMEOUT_SECONDS = 600
_LOCK = Path(tempfile.gettempdir()) / "tabserve-apt.lock"


class ToolUnavailable(RuntimeError):
    """The command is missing and installing its package failed or is impossible here."""


def _version_key(directory: str) -> list[int]:
    return [int(part) for part in re.findall(r"\d+", directory)]


def _find(command: str, also_in: Sequence[str] = ()) -> str | None:
    found = shutil.which(command)
    if found:
        return found
    directories = ["/usr/bin", "/usr/sbin", "/usr/local/bin"]
    for pattern in also_in:
        directories += sorted(glob.glob(pattern), key=_version_key, reverse=True)
    for directory in directories:
        path = os.path.join(directory, command)
        if os.access(path, os.X_OK):
            return path
    return None


def ensure_command(command: str, package: str, also_in: Sequence[str] = ()) -> str:
    """Path of `command`; installs Debian's `package` first when the command is not there.

    `also_in`: glob patterns of directories off PATH where the package puts the command (newest version first).
    """
    found = _find(command, also_in)
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise ToolUnavailable(f"{command} not found and apt-get is unavailable: install Debian's {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with open(_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _find(command, also_in)  # another process may have installed it while we waited
        if found:
            return found
        for cmd in ([apt, "update"], [apt, "install", "-y", "--no-install-recommends", package]):
            try:
                done = subprocess.run(
                    cmd, check=False, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_SECONDS, env=env
                )
            except subprocess.TimeoutExpired as exc:
                raise ToolUnavailable(f"`{' '.join(cmd)}` timed out after {INSTALL_TIMEOUT_SECONDS}s") from exc
            if done.returncode != 0:
                raise ToolUnavailable(
                    f"{command} not found and `{' '.join(cmd)}` failed ({done.returncode}):\n"
                    f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
                )
    found = _find(command, also_in)
    if not found:
        raise ToolUnavailable(f"installed Debian's {package} but {command} is still not found")
    return found
