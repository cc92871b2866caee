"""Every README code block meant to run runs, exactly as printed, against a live server.

The convention (stated in the README): every ```sh and ```python block runs, unless the line before
its fence is an `<!-- illustration: ... -->` comment. Blocks run from a scratch copy of the repository
root (top-level entries symlinked, `clients/` copied so that pip can build in it, `data/` its own) with
`TABSERVE_TARGET` set to a server serving that `data/` registry, as `make run` would.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tabserve_demo.embedded import bootstrap_embedded_registry
from tabserve_server.app import ServingApp
from tests.support import MODEL_NAME, server_settings, tritonclient_python, wait_for

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
RUNNABLE = ("sh", "python")
_FENCE = re.compile(r"^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```$", flags=re.MULTILINE | re.DOTALL)
_ILLUSTRATION = re.compile(r"^<!-- illustration:.*-->$")
# Made by the blocks or by pip (build/), or the scratch copy's own (data/, clients/).
_NOT_LINKED = {".git", "build", "data", "clients"}


@dataclass(frozen=True)
class Block:
    lang: str
    body: str
    line: int
    illustration: bool


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        blocks.append(Block(match["lang"], match["body"], line, bool(_ILLUSTRATION.match(before))))
    return blocks


BLOCKS = [b for b in readme_blocks(README.read_text()) if b.lang in RUNNABLE and not b.illustration]


def test_the_convention_holds_and_leaves_blocks_to_run() -> None:
    blocks = readme_blocks(README.read_text())
    # A shell or Python block fenced under another name would escape the run: say `sh` or `python`.
    escaping = [(b.line, b.lang) for b in blocks if b.lang in {"", "bash", "shell", "console", "zsh", "py", "python3"}]
    assert not escaping
    assert {b.lang for b in BLOCKS} == set(RUNNABLE)
    assert any("ScoringClient" in b.body for b in BLOCKS) and any("pip install ./clients" in b.body for b in BLOCKS)
    assert "<!-- illustration: why -->" in README.read_text()  # the convention is written down


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # `make` targets in a block depend on .venv/.installed: a stale one would reinstall into the scratch copy.
    stale = subprocess.run(["make", "-q", ".venv/.installed"], cwd=REPO, capture_output=True, check=False)
    assert stale.returncode == 0, "the project's .venv is out of date: run `make venv` first"
    root = tmp_path_factory.mktemp("readme")
    for entry in REPO.iterdir():
        if entry.name not in _NOT_LINKED:
            (root / entry.name).symlink_to(entry)
    shutil.copytree(
        REPO / "clients", root / "clients", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    return root


@pytest.fixture(scope="module")
def live_target(scratch: Path) -> Iterator[str]:
    """A server on the scratch copy's data/ registry, as `make run` sets it up (alias production)."""
    tracking_uri = bootstrap_embedded_registry(scratch / "data", model_name=MODEL_NAME)
    app = ServingApp(server_settings(tracking_uri, scratch / "data" / "cache"), registry=CollectorRegistry())
    app.start()
    try:
        wait_for(app.accepting, timeout=120, what="the README's server")
        yield f"127.0.0.1:{app.public_port}"
    finally:
        app.stop(1.0)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("block", BLOCKS, ids=[f"line-{b.line}-{b.lang}" for b in BLOCKS])
def test_block_runs_as_printed(block: Block, scratch: Path, live_target: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TABSERVE_")}
    env["TABSERVE_TARGET"] = live_target
    if block.lang == "sh":
        command = ["bash", "-euo", "pipefail", "-c", block.body]
    else:
        python = tritonclient_python() if "tritonclient" in block.body else Path(sys.executable)
        command = [str(python), "-c", block.body]
    done = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=840, check=False)
    assert done.returncode == 0, f"README line {block.line}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stdout.strip(), "the block printed nothing"


def test_the_python_versions_are_the_ones_the_projects_accept() -> None:
    text = README.read_text()
    server = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    low, high = re.fullmatch(r">=3\.(\d+),<3\.(\d+)", server).groups()  # type: ignore[union-attr]
    minors = [f"3.{m}" for m in range(int(low), int(high))]
    assert f"Python {', '.join(minors[:-1])} or {minors[-1]} as `python3`" in text
    client = tomllib.loads((REPO / "clients" / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f"Python {client.replace('>=', '>= ')} with grpcio" in text
