"""Point every alert's `runbook_url` (rules and their promtool tests) at one runbook URL, plus the alert's anchor.

`make alerts RUNBOOK_URL=...` writes the rules (and their promtool tests) with that URL; `make alerts-check`
fails when the checked-in files were not written with the Makefile's default `RUNBOOK_URL`. Only the
`runbook_url:` lines change: each keeps its `#anchor` (a heading of docs/runbook.md).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "monitor" / "alerts"
FILES = ("tabserve.rules.yml", "tabserve.rules.test.yml")
_RUNBOOK_LINE = re.compile(r'^(?P<indent>\s*runbook_url: )"[^"#]*#(?P<anchor>[\w-]+)"$', flags=re.MULTILINE)


def with_runbook_url(text: str, runbook_url: str) -> str:
    """`text` with every `runbook_url: "...#anchor"` line set to `runbook_url#anchor`."""
    return _RUNBOOK_LINE.sub(lambda m: f'{m["indent"]}"{runbook_url}#{m["anchor"]}"', text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runbook-url", required=True, help="absolute URL of docs/runbook.md as published")
    parser.add_argument("--out", type=Path, default=ALERTS, help="where to write (default: monitor/alerts)")
    parser.add_argument("--check", action="store_true", help="fail when the files in monitor/alerts differ")
    args = parser.parse_args(argv)
    if not re.match(r"^https?://[^\s\"#]+$", args.runbook_url):
        parser.error(f"--runbook-url must be an absolute http(s) URL without '#' or quotes: {args.runbook_url!r}")
    stale = []
    for name in FILES:
        text = (ALERTS / name).read_text()
        wanted = with_runbook_url(text, args.runbook_url)
        if args.check:
            if wanted != text:
                stale.append(name)
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / name).write_text(wanted)
    if stale:
        print(f"{', '.join(stale)}: runbook_url is not {args.runbook_url}#...; run `make alerts`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
