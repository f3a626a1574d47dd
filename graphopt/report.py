"""The compile report: per pass, what changed, how long it took and how it verified.

``report.json`` keeps, per pass: error vs the original graph, error vs the previous pass, node and
parameter counts, time, stats. ``report.html`` draws error vs original and node count per pass
(:mod:`graphopt.report_html`). ``format_table`` is what the CLI prints.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graphopt.ir.graph_ir import GraphIR
    from graphopt.passes.base import Pass

SCHEMA_VERSION = 1


class Report:
    def __init__(self, *, model: str = "", pipeline: str = "", target: str = "") -> None:
        self.data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "model": model, "pipeline": pipeline, "target": target,
            "original": {}, "passes": [], "lowering": None,
            "verification": {"enabled": True, "passed": None, "failed_pass": None},
        }
        self._t0 = time.perf_counter()

    @property
    def passes(self) -> list[dict[str, Any]]:
        return self.data["passes"]

    def set_original(self, ir: GraphIR) -> None:
        from graphopt.ir.analysis import peak_activation_bytes

        self.data["original"] = {"nodes": ir.node_count(), "params": ir.param_count(),
                                 "ops": ir.op_counts(), "peak_activation_bytes": peak_activation_bytes(ir),
                                 "capture": ir.meta.get("capture")}

    def start_pass(self, p: Pass, index: int, ir: GraphIR, plugin: str | None) -> dict[str, Any]:
        rec = {"index": index + 1, "name": p.name, "spec": p.spec(), "plugin": plugin,
               "nodes_before": ir.node_count(), "params_before": ir.param_count(),
               "changed": None, "stats": {}, "time_s": None, "verify": None}
        self.passes.append(rec)
        return rec

    def current(self) -> dict[str, Any] | None:
        return self.passes[-1] if self.passes else None

    def finish(self) -> None:
        self.data["total_time_s"] = round(time.perf_counter() - self._t0, 4)
        v = self.data["verification"]
        if v["enabled"] and v["passed"] is None:
            v["passed"] = all((r.get("verify") or {}).get("passed", True) for r in self.passes)

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, default=_json_default)

    def format_table(self) -> str:
        return format_table(self.data)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _fmt_err(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return "0" if x == 0 else f"{x:.2e}"


def _fmt_stats(stats: dict[str, Any]) -> str:
    """Scalar stats as ``k=v`` (dict-valued details stay in report.json)."""
    return " ".join(f"{k}={v}" for k, v in stats.items()
                    if isinstance(v, (int, float, str)) and not isinstance(v, bool) and k != "iterations")


def format_table(data: dict[str, Any]) -> str:
    """The per-pass verification report as a fixed-width text table."""
    rows = [("#", "pass", "nodes", "time", "policy", "err vs orig", "err vs prev", "result", "stats")]
    orig = data.get("original") or {}
    rows.append(("0", "capture", str(orig.get("nodes", "")), "", "", "", "", orig.get("capture") or "", ""))
    for r in data.get("passes", []):
        v = r.get("verify") or {}
        nodes = f"{r.get('nodes_before')}→{r.get('nodes_after', '?')}"
        t = f"{r['time_s']:.2f}s" if r.get("time_s") is not None else ""
        result = "ok" if v.get("passed") else ("FAILED" if v.get("passed") is False else
                                                ("skipped" if r.get("time_s") is None else "not verified"))
        rows.append((str(r["index"]), r["spec"], nodes, t, v.get("policy", "-"),
                     _fmt_err(v.get("error_vs_original")), _fmt_err(v.get("error_vs_previous")), result,
                     _fmt_stats(r.get("stats") or {})))
    low = data.get("lowering")
    if low:
        v = low.get("verify") or {}
        t = f"{low['time_s']:.2f}s" if low.get("time_s") is not None else ""
        result = "ok" if v.get("passed") else ("FAILED" if v.get("passed") is False else "not verified")
        rows.append(("→", f"lower:{low.get('target')}", str(low.get("nodes", "")), t, v.get("policy", "-"),
                     _fmt_err(v.get("error_vs_original")), "", result, ""))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
