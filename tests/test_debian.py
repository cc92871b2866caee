"""tools/debian.py finds a command off PATH in the directories a package uses, newest version first (Debian's
PostgreSQL: /usr/lib/postgresql/<version>/bin), without installing anything when it is there."""

from __future__ import annotations

from pathlib import Path

from tools.debian import ensure_command


def test_a_command_off_path_is_found_in_the_newest_version_directory(tmp_path: Path) -> None:
    for version in ("9.6", "15", "13"):
        directory = tmp_path / version / "bin"
        directory.mkdir(parents=True)
        command = directory / "tabserve-test-initdb"
        command.write_text("#!/bin/sh\n")
        command.chmod(0o755)
    found = ensure_command("tabserve-test-initdb", "no-such-package", also_in=(str(tmp_path / "*" / "bin"),))
    assert found == str(tmp_path / "15" / "bin" / "tabserve-test-initdb")
