"""latest.svg: stacked CPU µs per request per process, and requests/s, per variant (pure)."""

from __future__ import annotations

from html import escape
from typing import List, Mapping

from .report import KINDS, LABELS, Agg, Key

COLORS = {"proxy": "#4e79a7", "redis": "#e15759", "upstream": "#9c9c9c"}
SHORT = {"get": "GET", "post": "keyless POST", "new": "keyed, new key", "replay": "keyed, replay",
         "storm": "retry storm"}
ROW_H, TOP, LABEL_W, PANEL_W, GAP = 26, 70, 300, 330, 70
X_CPU, X_RPS = LABEL_W, LABEL_W + PANEL_W + GAP


def _head(env: Mapping[str, str], width: int, height: int) -> List[str]:
    """The frame, the title, the panel titles and the legend."""
    quick = " (QUICK)" if env.get("quick") == "1" else ""
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="22" font-size="16" font-weight="bold">idemproxy load benchmark'
           f'{quick} — {escape(env["date"])}, commit {escape(env["commit"])}</text>',
           f'<text x="{X_CPU}" y="{TOP - 28}" font-weight="bold">server CPU µs per request (median)</text>',
           f'<text x="{X_RPS}" y="{TOP - 28}" font-weight="bold">requests/s (median)</text>']
    for i, kind in enumerate(KINDS):
        x = X_CPU + 80 * i
        out.append(f'<rect x="{x}" y="{TOP - 20}" width="10" height="10" fill="{COLORS[kind]}"/>'
                   f'<text x="{x + 14}" y="{TOP - 11}">{kind}</text>')
    return out


def _row(i: int, key: Key, a: dict, max_cpu: float, max_rps: float) -> List[str]:
    """One variant: its label, its CPU bar stacked by process, its req/s bar."""
    y = TOP + i * ROW_H
    num, _, variant = LABELS[key]
    out = [f'<text x="{LABEL_W - 8}" y="{y + 15}" text-anchor="end">'
           f'{escape(f"{num}. {SHORT[key[0]]} · {variant}")}</text>']
    x = X_CPU
    for kind in KINDS:
        v = a["cpu"].get(kind, 0) or 0
        bw = PANEL_W * v / max_cpu
        if bw > 0:
            out.append(f'<rect x="{x:.1f}" y="{y + 3}" width="{bw:.1f}" height="{ROW_H - 8}" fill="{COLORS[kind]}">'
                       f'<title>{kind}: {v:.1f} µs</title></rect>')
        x += bw
    out.append(f'<text x="{x + 4:.1f}" y="{y + 15}">{a["cpu_total"]:.1f}</text>')
    bw = PANEL_W * a["rps"] / max_rps
    out.append(f'<rect x="{X_RPS}" y="{y + 3}" width="{bw:.1f}" height="{ROW_H - 8}" fill="#59a14f"/>')
    out.append(f'<text x="{X_RPS + bw + 4:.1f}" y="{y + 15}">{a["rps"]:,.0f}</text>')
    return out


def svg(env: Mapping[str, str], agg: Agg) -> str:
    """The whole chart, one row per variant that ran, in table order."""
    rows = list(agg.items())
    height = TOP + ROW_H * len(rows) + 40
    width = LABEL_W + 2 * PANEL_W + GAP + 80
    max_cpu = max((a["cpu_total"] for _, a in rows), default=1) or 1
    max_rps = max((a["rps"] for _, a in rows), default=1) or 1
    out = _head(env, width, height)
    for i, (key, a) in enumerate(rows):
        out += _row(i, key, a, max_cpu, max_rps)
    out.append(f'<text x="10" y="{height - 12}" fill="#555">{escape(env["ncpu"])} cores; wrk -c{escape(env["conns"])} '
               f'on core {escape(env["load_cpus"])}, servers on core {escape(env["server_cpus"])}; '
               f'{escape(env["rounds"])} rounds × {escape(env["duration"])} s; see latest.md</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
