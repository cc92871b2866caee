"""The monitor's status page (`/` on its metrics listener): one self-contained HTML page, state only.

No script, no stylesheet or image from elsewhere: inline CSS and an inline SVG bar chart of the server's score
histogram. Every text that comes from the registry, the server or a setting is escaped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from html import escape

from tabserve_monitor.state import Snapshot

__all__ = ["render"]

Bucket = tuple[float, float]  # (upper bound, cumulative count), as a Prometheus histogram states it

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.05em; margin-top: 1.4em; }
table { border-collapse: collapse; } td, th { padding: 2px 10px 2px 0; text-align: left; vertical-align: top; }
.ok { color: #17663a; font-weight: 600; } .bad { color: #b3261e; font-weight: 600; }
.version { font-size: 1.6em; font-weight: 700; } #reloads td:first-child { white-space: nowrap; }
#reloads td:last-child { overflow-wrap: anywhere; max-width: 60em; }
"""


def _flag(ok: bool, yes: str = "up", no: str = "down") -> str:
    return f'<span class="ok">{yes}</span>' if ok else f'<span class="bad">{no}</span>'


def _when(at: float | None, now: float) -> str:
    if at is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
    return f"{stamp} ({max(0.0, now - at):.0f} s ago)"


def _rows(pairs: Sequence[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in pairs)


def _versions(s: Snapshot) -> str:
    same = bool(s.target_version) and s.target_version == s.served_version
    return (
        '<table id="versions">'
        f'<tr><th>served</th><td class="version" id="served">{escape(s.served_version or "none")}</td></tr>'
        f'<tr><th>target</th><td class="version" id="target">{escape(s.target_version or "none")}</td></tr>'
        f"<tr><th></th><td>{_flag(same, 'served = target', 'served differs from target')}</td></tr>"
        + _rows([("load state", escape(s.load_state or "unknown")), ("last error", escape(s.last_error or "none"))])
        + "</table>"
    )


def _health(s: Snapshot, now: float) -> str:
    canary = "off" if not s.canary_enabled else (
        f"{_flag(s.canary_result == 'success', 'success', escape(s.canary_result or 'not run yet'))}"
        + (f" in {s.canary_seconds * 1000:.1f} ms" if s.canary_seconds is not None else "")
    )
    problem = escape(s.registry_problem or "none") + (f": {escape(s.registry_detail)}" if s.registry_problem else "")
    return "<table>" + _rows([
        ("registry", _flag(s.registry_up, "reachable", "unreachable: " + escape(s.registry_detail))),
        ("registry problem", problem),
        ("target ambiguous", _flag(not s.ambiguous, "no", "yes: " + escape(s.registry_detail))),
        ("server health", _flag(s.server_up, "SERVING", "not serving")),
        ("control port", _flag(s.control_up)),
        ("canary", canary),
        ("last poll", _when(s.last_poll_at, now)),
    ]) + "</table>"


def _reloads(s: Snapshot, now: float) -> str:
    if not s.reloads:
        return "<p>No reload observed since the monitor started.</p>"
    rows = "".join(
        f"<tr><td>{_when(e.at, now)}</td><td>{_flag(e.result == 'success', 'success', 'failure')}"
        f"{f' &times; {e.repeats}' if e.repeats > 1 else ''}</td>"
        f"<td>{escape(e.previous or 'none')} &rarr; {escape(e.version)}</td><td>{escape(e.reason)}</td></tr>"
        for e in reversed(s.reloads)
    )
    return ('<table id="reloads"><tr><th>observed</th><th>result</th><th>version</th><th>reason</th></tr>'
            f"{rows}</table>")


def histogram_chart(buckets: Sequence[Bucket], width: int = 520, height: int = 180) -> str:
    """An inline SVG bar per bucket (counts, not cumulative), labelled with the bucket's upper bound."""
    counts = [c - (buckets[i - 1][1] if i else 0.0) for i, (_, c) in enumerate(buckets)]
    top = max(counts, default=0.0) or 1.0
    bar = width / max(len(buckets), 1)
    parts = [f'<svg id="scores" width="{width}" height="{height + 30}" '
             f'role="img" aria-label="score histogram">']
    for i, ((edge, _), count) in enumerate(zip(buckets, counts, strict=True)):
        h = height * count / top
        label = "+Inf" if edge == float("inf") else f"{edge:g}"
        parts.append(f'<rect x="{i * bar + 1:.1f}" y="{height - h:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" '
                     f'fill="#3b6fb6"><title>&le; {label}: {count:.0f} rows</title></rect>')
        if i % 2 == 1 or len(buckets) <= 10:
            parts.append(f'<text x="{i * bar + bar / 2:.1f}" y="{height + 14}" font-size="10" '
                         f'text-anchor="middle">{label}</text>')
    parts.append(f'<text x="0" y="{height + 28}" font-size="10">score bucket (upper bound); tallest bar '
                 f"{top:.0f} rows</text></svg>")
    return "".join(parts)


def _scores(buckets: Sequence[Bucket] | None, source: str) -> str:
    if buckets is None:
        return f"<p>Not available: the server's metrics ({escape(source or 'not configured')}) did not answer.</p>"
    total = buckets[-1][1] if buckets else 0.0
    return f"<p>{total:.0f} rows scored since the server started (from {escape(source)}).</p>{histogram_chart(buckets)}"


def render(s: Snapshot, buckets: Sequence[Bucket] | None, source: str, now: float | None = None) -> str:
    """The whole page. `buckets`: the server's score histogram, None when it could not be read from `source`."""
    now = time.time() if now is None else now
    title = f"tabserve monitor: {s.model_name} ({s.follows})"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="refresh" content="10">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{escape(title)}</h1>"
        f"<h2>Versions</h2>{_versions(s)}"
        f"<h2>Registry and canary</h2>{_health(s, now)}"
        f"<h2>Score distribution</h2>{_scores(buckets, source)}"
        f"<h2>Reloads (last {len(s.reloads)}, newest first)</h2>{_reloads(s, now)}"
        f"<p><small>State only; refreshed every 10 s. Metrics: <a href=\"/metrics\">/metrics</a>.</small></p>"
        "</body></html>"
    )
