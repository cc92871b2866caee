"""Find a command from a Debian package, installing the package with apt-get when it is missing.

Tests and the benchmark need real third-party tools (promtool and prometheus from `prometheus`,
h2load from `nghttp2-client`); a fresh machine or CI does not have them. Installs are serialised
with a lock file, because two apt-get runs at once fail on dpkg's own lock.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

INSTALL_TIMEOUT_SECONDS = 600
_LOCK = Path(tempfile.gettempdir()) / "tabserve-apt.lock"


class ToolUnavailable(RuntimeError):
    """The command is missing and installing its package failed or is impossible here."""


def _find(command: str) -> str | None:
    found = shutil.which(command)
    if found:
        return found
    for directory in ("/usr/bin", "/usr/sbin", "/usr/local/bin"):
        path = os.path.join(directory, command)
        if os.access(path, os.X_OK):
            return path
    return None


def ensure_command(command: str, package: str) -> str:
    """Path of `command`; installs Debian's `package` first when the command is not there."""
    found = _find(command)
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise ToolUnavailable(f"{command} not found and apt-get is unavailable: install Debian's {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with open(_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _find(command)  # another process may have installed it while we waited
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
    found = _find(command)
    if not found:
        raise ToolUnavailable(f"installed Debian's {package} but {command} is still not found")
    return found
