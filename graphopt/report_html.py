"""report.html: the verification report as one self-contained page with inline SVG charts.

No plotting library and no JavaScript: the page must open from an artifact directory on an
air-gapped build machine. Two charts: error vs the original graph per pass (log scale) and node
count per pass; then the per-pass table.
"""

from __future__ import annotations

import html
import math
from typing import Any

from graphopt.report import format_table


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _bar_chart(title: str, labels: list[str], values: list[float | None], *, log: bool, color: str,
               fmt: str) -> str:
    w, h, left, bottom, top = 760, 260, 70, 70, 30
    n = max(len(labels), 1)
    bw = (w - left - 20) / n
    vals = [v for v in values if v is not None and (v > 0 or not log)]
    if log:
        floor = 1e-12
        lo = math.log10(max(min(vals), floor)) if vals else -12
        hi = math.log10(max(max(vals), floor)) if vals else 0
        lo, hi = math.floor(lo) - 1, math.ceil(hi) + (1 if math.ceil(hi) == math.floor(lo) else 0)
    else:
        lo, hi = 0.0, (max(vals) if vals else 1.0) * 1.1 or 1.0
    span = (hi - lo) or 1.0

    def y(v: float) -> float:
        t = (math.log10(max(v, 1e-12)) if log else v)
        return top + (h - top - bottom) * (1 - (t - lo) / span)

    parts = [f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{left}" y="18" font-size="14" font-weight="bold">{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{h - bottom}" x2="{w - 10}" y2="{h - bottom}" stroke="#444"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="#444"/>']
    ticks = range(int(lo), int(hi) + 1) if log else [lo + span * i / 4 for i in range(5)]
    for t in ticks:
        v = 10 ** t if log else t
        yy = y(v)
        label = f"1e{int(t)}" if log else f"{v:.0f}"
        parts.append(f'<line x1="{left - 4}" y1="{yy:.1f}" x2="{w - 10}" y2="{yy:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 8}" y="{yy + 4:.1f}" font-size="10" text-anchor="end">{label}</text>')
    for i, (lab, v) in enumerate(zip(labels, values)):
        x = left + i * bw + bw * 0.15
        if v is None:
            parts.append(f'<text x="{x + bw * 0.35:.1f}" y="{h - bottom - 4}" font-size="10" text-anchor="middle">n/a</text>')
        else:
            shown = v if not log or v > 0 else 10 ** lo
            yy = y(shown)
            parts.append(f'<rect x="{x:.1f}" y="{yy:.1f}" width="{bw * 0.7:.1f}" height="{max(h - bottom - yy, 1):.1f}" '
                         f'fill="{color}"><title>{html.escape(lab)}: {fmt.format(v)}</title></rect>')
            parts.append(f'<text x="{x + bw * 0.35:.1f}" y="{yy - 3:.1f}" font-size="9" text-anchor="middle">'
                         f'{html.escape(fmt.format(v))}</text>')
        parts.append(f'<text transform="translate({x + bw * 0.35:.1f},{h - bottom + 12}) rotate(30)" font-size="10">'
                     f'{html.escape(lab[:28])}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def render_html(data: dict[str, Any]) -> str:
    passes = data.get("passes", [])
    labels = ["capture"] + [f"{r['index']}. {r['name']}" for r in passes]
    errs: list[float | None] = [0.0] + [_num((r.get("verify") or {}).get("error_vs_original")) for r in passes]
    nodes: list[float | None] = [_num((data.get("original") or {}).get("nodes"))] + [_num(r.get("nodes_after")) for r in passes]
    low = data.get("lowering")
    if low:
        labels.append(f"lower:{low.get('target')}")
        errs.append(_num((low.get("verify") or {}).get("error_vs_original")))
        nodes.append(_num(low.get("nodes")))
    v = data.get("verification") or {}
    status = ("verification passed" if v.get("passed") else
              f"verification FAILED at {v.get('failed_pass')}" if v.get("passed") is False else "not verified")
    rows = []
    for r in passes:
        vr = r.get("verify") or {}
        div = vr.get("first_divergence") or {}
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
            r["index"], r["spec"], r.get("plugin") or "", f"{r.get('nodes_before')} → {r.get('nodes_after', '?')}",
            f"{r['time_s']:.3f}s" if r.get("time_s") is not None else "", vr.get("policy", ""),
            vr.get("error_vs_original", ""), vr.get("error_vs_previous", ""),
            "ok" if vr.get("passed") else ("FAILED: " + str(vr.get("message", "")) if vr else ""),
            ", ".join(f"{k}={val}" for k, val in (r.get("stats") or {}).items()),
            div.get("format", ""))) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("#", "pass", "plugin", "nodes", "time", "policy", "err vs original",
                                              "err vs previous", "result", "stats", "first diverging node"))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>graphopt report: {html.escape(str(data.get('model', '')))}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left}} th{{background:#f3f3f3}}
.ok{{color:#1a7f37}} .bad{{color:#b42318}} pre{{background:#f7f7f7;padding:1em;overflow:auto}}</style></head>
<body>
<h1>graphopt compile report</h1>
<p><b>model</b> {html.escape(str(data.get('model', '')))} &nbsp; <b>target</b> {html.escape(str(data.get('target', '')))}
&nbsp; <b>pipeline</b> <code>{html.escape(str(data.get('pipeline', '')))}</code>
&nbsp; <b class="{'ok' if v.get('passed') else 'bad'}">{html.escape(status)}</b>
&nbsp; total {data.get('total_time_s', 0):.2f}s</p>
{_bar_chart("max abs error vs the original graph (log scale)", labels, errs, log=True, color="#d9822b", fmt="{:.1e}")}
{_bar_chart("compute nodes after each step", labels, nodes, log=False, color="#2b6cb0", fmt="{:.0f}")}
<h2>Passes</h2>
<table><tr>{head}</tr>
{''.join(rows)}
</table>
<h2>As text</h2>
<pre>{html.escape(format_table(data))}</pre>
</body></html>
"""
