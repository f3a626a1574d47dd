"""Writes a case's results: ``<case>.json`` (everything), ``<case>.md`` (the tables to paste) and
``<case>.png`` (the chart), each stamped with the machine description."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from bench.harness import CaseResult, SystemResult
from bench.machine import one_line

KIND_COLORS = {"baseline": "#7f7f7f", "peer": "#4c72b0", "graphopt": "#dd8452"}
PHASE_COLORS = {"capture": "#4c72b0", "passes": "#55a868", "verification": "#c44e52", "lowering": "#8172b2",
                "lowering_verification": "#ccb974", "writing": "#64b5cd"}


def write_all(result: CaseResult, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{result.case}.json", out_dir / f"{result.case}.md", out_dir / f"{result.case}.png"]
    paths[0].write_text(json.dumps(result.to_json(), indent=2, default=_json_default) + "\n")
    paths[1].write_text(markdown(result))
    chart(result, paths[2])
    return paths


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


# -- formatting ----------------------------------------------------------------------------------

def fmt_time(s: float | None) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def fmt_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) < 1e-3 or abs(v) >= 1e5:
            return f"{v:.2e}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {fmt_value(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(fmt_value(x) for x in v)
    return str(v)


def fmt_spread(d: dict[str, float] | None, digits: int = 2, unit: str = "×") -> str:
    if not d or not d.get("n", 1) or "median" not in d:
        return "-"
    return f"{d['median']:.{digits}f}{unit} [{d['p10']:.{digits}f}, {d['p90']:.{digits}f}]"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_block(r: CaseResult) -> str:
    m = r.machine
    if not m:
        return ""
    v = m.get("versions", {})
    gpu = m.get("gpu")
    rows = [
        ["CPU", f"{m.get('cpu')} ({m.get('usable_cpus')} usable CPUs of {m.get('logical_cpus')}, "
                f"{m.get('physical_cores') or '?'} physical cores"
                + (f", cgroup quota {m['cgroup_cpu_quota']} CPUs" if m.get("cgroup_cpu_quota") else "") + ")"],
        ["threads", f"{m.get('threads')} (torch.set_num_threads, ORT intra_op_num_threads)"],
        ["RAM", f"{m.get('ram_gib')} GiB"],
        ["device", f"{m.get('device')}" + (f": {gpu['name']} ({gpu['memory_gib']} GiB, sm {gpu['compute_capability']}, "
                                          f"CUDA {gpu['cuda']})" if gpu else "")],
        ["versions", ", ".join(f"{k} {x}" for k, x in v.items() if x)],
        ["date (UTC)", m.get("date", "")],
        ["load average", f"{m.get('load_average_at_start')} at start, {m.get('load_average_at_end')} at end"],
    ]
    c = m.get("cpu_during_case")
    if c:
        rows.append(["CPUs in use during the case (average)", f"{c['bench_cpus']} by the bench and its subprocesses, "
                     f"{c['other_cpus']} by other processes, {c['steal_cpus']} stolen by the hypervisor"])
    return _table(["machine", ""], rows)


def rates_line(r: CaseResult) -> str:
    rt = r.rates
    if not rt:
        return ""
    return (f"Measured in this run: peak GEMM **{rt['gemm_flops'] / 1e9:.1f} GFLOP/s** (fp32 torch.mm "
            f"{rt['gemm_n']}³), memory read **{rt['mem_bw'] / 1e9:.1f} GB/s** (sum over {rt['mem_bytes'] >> 20} MiB); "
            f"{rt['method']}.")


def floor_line(fl: dict[str, Any]) -> str:
    return (f"Floor: **{fmt_time(fl['time_s'])}** ({fl['bound']}-bound; {fl['flops'] / 1e9:.2f} GFLOP → "
            f"{fmt_time(fl['compute_s'])}, {fl['bytes'] / 1e6:.1f} MB → {fmt_time(fl['memory_s'])}; "
            f"{fl['forwards']} forward(s)). {fl.get('formula', '')}")


# -- markdown ------------------------------------------------------------------------------------

def markdown(r: CaseResult) -> str:
    parts = [f"# {r.title}", "", f"_{one_line(r.machine)}_" if r.machine else "", ""]
    settings = ", ".join(f"{k} {fmt_value(v)}" for k, v in r.settings.items()
                         if k not in ("graphopt_pipelines", "models") or not isinstance(v, dict))
    parts += [f"Case `{r.case}`: {settings}.", ""]
    if r.rates:
        parts += [rates_line(r), ""]
    if r.kind == "latency":
        parts += _latency_md(r)
    elif r.kind == "scale":
        parts += _scale_md(r)
    elif r.kind == "serve":
        parts += _serve_md(r)
    elif r.kind == "parallel":
        parts += _parallel_md(r)
    else:
        parts += _compile_md(r)
    if r.notes:
        parts += ["Notes:", ""] + [f"- {n}" for n in r.notes] + [""]
    if r.elapsed_s is not None:
        parts += [f"Case wall time: {r.elapsed_s:.0f} s.", ""]
    parts += [machine_block(r), ""]
    return "\n".join(parts)


def _groups(r: CaseResult) -> list[str]:
    seen: list[str] = []
    for s in r.systems:
        if s.group not in seen:
            seen.append(s.group)
    return seen


def _latency_md(r: CaseResult) -> list[str]:
    out: list[str] = []
    for g in _groups(r):
        systems = [s for s in r.systems if s.group == g]
        base = r.baselines.get(g, "baseline")
        if len(_groups(r)) > 1 or g not in (r.case, ""):
            out += [f"## {g}", ""]
        if g in r.floors:
            out += [floor_line(r.floors[g]), ""]
        qkeys: list[str] = []
        for s in systems:
            qkeys += [k for k in s.quality if k not in qkeys]
        has_tp = any(s.throughput for s in systems)
        header = (["system", "median", "p10", "p90", "IQR"] + ([f"{systems[0].throughput['unit']}" if systems[0].throughput
                                                               else "throughput"] if has_tp else [])
                  + [f"speedup vs {base} (median [p10, p90])", "× floor (median)"] + qkeys + ["details"])
        rows = []
        for s in systems:
            if s.status != "ok":
                continue
            lat = s.latency_s or {}
            row = [s.name, fmt_time(lat.get("median")), fmt_time(lat.get("p10")), fmt_time(lat.get("p90")),
                   fmt_time(lat.get("iqr"))]
            if has_tp:
                row.append(f"{s.throughput['median']:.1f}" if s.throughput else "-")
            row += [fmt_spread(s.speedup), f"{s.floor_ratio['median']:.1f}×" if s.floor_ratio else "-"]
            row += [fmt_value(s.quality.get(k)) for k in qkeys]
            row.append(_details(s))
            rows.append(row)
        out += [_table(header, rows), ""]
        others = [s for s in systems if s.status != "ok"]
        if others:
            out += [f"- **{s.name}**: {s.status}: {s.note}" for s in others] + [""]
        n = systems[0].latency_s.get("n") if systems and systems[0].latency_s else 0
        out += [f"{n} interleaved timed rounds per system; speedup is computed per round (paired) "
                f"as {base} time / system time; × floor = time / floor.", ""]
        out += _ceiling_md([row for row in r.rows if row.get("group") == g and "ceiling" in row])
    return out


def _ceiling_md(rows: list[dict[str, Any]]) -> list[str]:
    """The speculative case's ceiling of each drafter on a prompt (bench/cases/speculative.py)."""
    if not rows:
        return []
    table = [[row["drafter"], f"{row['ceiling']:.2f}×", str(row["target_calls"]), str(row["k"]),
              f"{row['fixed']:.2f}×", f"{row['acceptance']:.2f}",
              f"{row['draft_call_ms']:.3f} ms" if row.get("draft_call_ms") is not None else "-",
              f"{row['agreement']:.2f}" if row.get("agreement") is not None else "-"] for row in rows]
    return [f"Ceiling of any speculative loop with no costs of its own: the target's greedy tokens replayed, "
            f"each call priced as a bare ONNX Runtime call (target {rows[0]['target_call_ms_1']:.3f} ms for 1 "
            f"token, {rows[0]['target_call_ms_5']:.3f} ms for 5; each model's fastest session), speedup over "
            "plain one-token calls:", "",
            _table(["drafter", "ceiling (oracle draft lengths)", "target calls", "best fixed k", "its speedup",
                    "acceptance at that k", "draft call", "draft agreement (teacher-forced)"], table), ""]


def _details(s: SystemResult) -> str:
    bits = []
    if s.setup_s is not None:
        bits.append(f"setup {s.setup_s:.1f}s")
    for k, v in s.info.items():
        if k in ("pipeline", "providers") or v is None:
            continue
        if k == "pass_stats":  # all of it is in the JSON; the table keeps what fusions did
            fused = {f"{p} {sk}": sv for p, st in v.items() for sk, sv in st.items() if "fuse" in sk.lower()}
            if fused:
                bits.append(f"fused: {fmt_value(fused)}")
            continue
        bits.append(f"{k}: {fmt_value(v)}")
    if s.note:
        bits.append(s.note)
    return "; ".join(bits)


def _compile_md(r: CaseResult) -> list[str]:
    header = ["model", "pipeline", "target", "nodes", "total (verified)", "total (--no-verify)",
              "verification share (vs --no-verify)", "verification share (phases)", "verified ÷ unverified"
              ] + PHASES_LABELS
    rows, others = [], []
    for row in r.rows:
        if row.get("status") != "ok":
            others.append(f"- **{row['model']} / {row['pipeline']}**: {row.get('status')}: {row.get('note')}")
            continue
        ph = row["phases_s"]
        frac = row["verification_fraction"]
        rows.append([row["model"], row["pipeline"], row["target"], f"{row['nodes_before']}→{row['nodes_after']}",
                     fmt_spread(row["total_verified_s"], 2, " s"), fmt_spread(row["total_unverified_s"], 2, " s"),
                     _pct(frac), _pct(row["verification_fraction_phases"]),
                     fmt_spread(row["verified_over_unverified"])]
                    + [fmt_time(ph[p]["median"]) for p in PHASES_LABEL_KEYS])
    out = [_table(header, rows), ""] + (others + [""] if others else [])
    out += ["Phases are medians over the rounds of the verified compile (writing: of the unverified one); "
            "*lowering verification* is derived (verified residue − unverified residue) and includes the "
            "reference runs of the original graph. Verification share (vs --no-verify) = (verified − unverified) "
            "/ verified, per round; (phases) = (verification + lowering verification) / verified total, "
            "which drift between the two compiles cannot swamp.", ""]
    return out


def _pct(d: dict[str, float]) -> str:
    return f"{d['median'] * 100:.0f}% [{d['p10'] * 100:.0f}, {d['p90'] * 100:.0f}]"


def _gib(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} GiB"


def _bytes(v: int | None) -> str:
    if not v:
        return "-"
    return f"{v / 2**30:.2f} GiB" if v >= 2**30 else f"{v / 2**20:.1f} MiB"


def _models(r: CaseResult) -> list[str]:
    seen: list[str] = []
    for row in r.rows:
        if row["model"] not in seen:
            seen.append(row["model"])
    return seen


def _scale_md(r: CaseResult) -> list[str]:
    """The scale case: per model, one table of processes (time, peak RSS, artifact), the phases of
    graphopt's compiles, then the decode groups as latency tables (vs HF generate, × floor)."""
    out: list[str] = []
    for model in _models(r):
        rows = [row for row in r.rows if row["model"] == model]
        params = (r.settings.get("parameters") or {}).get(model)
        ck_bytes = (r.settings.get("checkpoint_bytes") or {}).get(model)
        title = (r.settings.get("models") or {}).get(model, model)
        out += [f"## {model}: {title}" + (f", {params / 1e6:.1f}M parameters, checkpoint {_bytes(ck_bytes)}"
                                         if params else ""), ""]
        table = []
        for row in rows:
            peak = row.get("peak_rss_gib")
            ratio = f"{peak * 2**30 / ck_bytes:.2f}×" if peak and ck_bytes else "-"
            extra = []
            if row.get("verified") is not None:
                extra.append(f"verified: {fmt_value(row['verified'])}")
            if row.get("reported_peak_rss_gib") is not None:
                extra.append(f"report.json peak {row['reported_peak_rss_gib']:.2f} GiB")
            for k in ("load_s", "export_s", "onnx_s"):
                if row.get(k) is not None:
                    extra.append(f"{k.removesuffix('_s')} {row[k]:.1f}s")
            if row.get("note"):
                extra.append(row["note"])
            table.append([row["system"], row["stage"], row["status"],
                          f"{row['time_s']:.1f} s" if row.get("time_s") is not None else "-", _gib(peak), ratio,
                          _bytes(row.get("artifact_bytes")), "; ".join(extra)])
        out += [_table(["system", "stage", "status", "time", "peak RSS", "peak ÷ checkpoint", "output size",
                        "details"], table), ""]
        for row in rows:
            phases = [ph for ph in row.get("phases") or [] if ph.get("phase")]
            if not phases or row["status"] != "ok":
                continue
            out += [f"Phases of `{row['system']}` (report.json):", ""]
            out += [_table(["phase", "time", "RSS after", "peak RSS"],
                           [[ph["phase"], f"{ph['time_s']:.2f} s" if ph.get("time_s") is not None else "-",
                             _gib(ph.get("rss_gib")), _gib(ph.get("peak_rss_gib"))] for ph in phases]), ""]
        groups = [g for g in _groups(r) if g.startswith(f"{model} · ")]
        if groups:
            out += _latency_md(dataclasses.replace(r, systems=[s for s in r.systems if s.group in groups]))
    out += ["Every system runs in its own process; peak RSS is that process's (its VmRSS/VmHWM sampled every "
            "0.1 s), file-backed weight pages included. A failed process keeps its peak.", ""]
    return out


def _scale_chart(r: CaseResult, plt: Any) -> Any:
    models = _models(r)
    fig, axes = plt.subplots(max(1, len(models)), 3, figsize=(15, 3.2 * max(1, len(models)) + 0.8), squeeze=False)
    fig.suptitle(r.title, fontsize=12)
    for mi, model in enumerate(models):
        rows = [row for row in r.rows if row["model"] == model and row.get("peak_rss_gib") is not None]
        names = [row["system"][:48] for row in rows][::-1]
        colors = [KIND_COLORS.get(row["kind"], "#4c72b0") if row["status"] == "ok" else "#c44e52"
                  for row in rows][::-1]
        ax = axes[mi][0]
        ax.barh(names, [row["peak_rss_gib"] for row in rows][::-1], color=colors)
        ck = (r.settings.get("checkpoint_bytes") or {}).get(model)
        if ck:
            ax.axvline(ck / 2**30, color="black", lw=0.8, ls="--")
        ax.set_xlabel("peak RSS (GiB; dashed: checkpoint size; red: failed)")
        ax.set_title(model, loc="left", fontsize=10)
        ax = axes[mi][1]
        ax.barh(names, [row.get("time_s") or 0 for row in rows][::-1], color=colors)
        ax.set_yticklabels([])
        ax.set_xlabel("wall time (s)")
        ax = axes[mi][2]
        systems = [s for s in r.systems if s.group.startswith(f"{model} · ") and s.throughput]
        if systems:
            labels = [f"{s.name[:40]} [{s.group.split(' · ')[-1]}]" for s in systems][::-1]
            ax.barh(labels, [s.throughput["median"] for s in systems][::-1],
                    color=[KIND_COLORS.get(s.kind, "#4c72b0") for s in systems][::-1])
            for g in {s.group for s in systems}:
                fl = r.floors.get(g) or {}
                if fl.get("tokens_per_s"):
                    ax.axvline(fl["tokens_per_s"], color="black", lw=0.8, ls=":")
            ax.set_xlabel("decode tokens/s (dotted: memory floors)")
            ax.tick_params(axis="y", labelsize=7)
        else:
            ax.axis("off")
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    return fig


PHASES_LABEL_KEYS = ["capture", "passes", "verification", "lowering", "lowering_verification", "writing"]
PHASES_LABELS = ["capture", "passes", "verification", "lowering", "lowering verification*", "writing"]


# -- charts --------------------------------------------------------------------------------------

def chart(r: CaseResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if r.kind == "latency":
        fig = _latency_chart(r, plt)
    elif r.kind == "scale":
        fig = _scale_chart(r, plt)
    elif r.kind == "serve":
        fig = _serve_chart(r, plt)
    elif r.kind == "parallel":
        fig = _parallel_chart(r, plt)
    else:
        fig = _compile_chart(r, plt)
    fig.text(0.01, 0.005, one_line(r.machine) if r.machine else "", fontsize=7, color="#555555")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _latency_chart(r: CaseResult, plt: Any) -> Any:
    groups = _groups(r) or [""]
    heights = [max(1.6, 0.45 * sum(1 for s in r.systems if s.group == g and s.status == "ok") + 1.0)
               for g in groups]
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, sum(heights) + 0.8), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    fig.suptitle(r.title, fontsize=12)
    for gi, g in enumerate(groups):
        systems = [s for s in r.systems if s.group == g and s.status == "ok" and s.speedup]
        names = [s.name for s in systems][::-1]
        sp = [s.speedup for s in systems][::-1]
        colors = [KIND_COLORS.get(s.kind, "#4c72b0") for s in systems][::-1]
        ax = axes[gi][0]
        if systems:
            med = [d["median"] for d in sp]
            err = [[max(0.0, d["median"] - d["p10"]) for d in sp], [max(0.0, d["p90"] - d["median"]) for d in sp]]
            ax.barh(names, med, xerr=err, color=colors, capsize=3)
            ax.axvline(1.0, color="black", lw=0.8)
            for y, m in enumerate(med):
                ax.annotate(f"{m:.2f}×", (m, y), xytext=(3, 3), textcoords="offset points", fontsize=8)
        base = r.baselines.get(g, "baseline")
        ax.set_xlabel(f"speedup vs {base} (median, p10–p90; >1 is faster)")
        ax.set_title(g, loc="left", fontsize=10)
        ax2 = axes[gi][1]
        fr = [s.floor_ratio for s in systems][::-1]
        if systems and all(fr):
            med = [d["median"] for d in fr]
            err = [[max(0.0, d["median"] - d["p10"]) for d in fr], [max(0.0, d["p90"] - d["median"]) for d in fr]]
            ax2.barh(names, med, xerr=err, color=colors, capsize=3)
            for y, m in enumerate(med):
                ax2.annotate(f"{m:.1f}×", (m, y), xytext=(3, 3), textcoords="offset points", fontsize=8)
            ax2.set_xscale("log")
            ax2.axvline(1.0, color="black", lw=0.8)
            ax2.set_yticklabels([])
            ax2.set_xlabel("time / physical floor (log; 1 = the machine's limit)")
        else:
            ax2.axis("off")
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    return fig


def _compile_chart(r: CaseResult, plt: Any) -> Any:
    rows = [row for row in r.rows if row.get("status") == "ok"]
    labels, segments = [], []
    for row in rows:
        ph = row["phases_s"]
        labels.append(f"{row['model']} · {row['pipeline']}")
        segments.append([ph[p]["median"] for p in PHASES_LABEL_KEYS])
        nv = row["phases_unverified_s"]
        labels.append(f"{row['model']} · {row['pipeline']} (--no-verify)")
        segments.append([nv["capture"]["median"], nv["passes"]["median"], 0.0, nv["lowering"]["median"], 0.0,
                         nv["writing"]["median"]])
    fig, ax = plt.subplots(figsize=(11, max(2.0, 0.4 * len(labels) + 1.4)))
    fig.suptitle(r.title, fontsize=12)
    left = [0.0] * len(labels)
    ys = list(range(len(labels)))[::-1]
    for i, (key, label) in enumerate(zip(PHASES_LABEL_KEYS, PHASES_LABELS)):
        widths = [seg[i] for seg in segments]
        ax.barh(ys, widths, left=left, color=PHASE_COLORS[key], label=label)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(ys, labels)
    ax.set_xlabel("seconds (median over rounds)")
    if labels:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    return fig


# -- serve -----------------------------------------------------------------------------------------

def _serve_md(r: CaseResult) -> list[str]:
    out: list[str] = []
    for model in dict.fromkeys(row["model"] for row in r.rows):
        out += [f"### {model}", ""]
        header = ["system", "clients", "requests (failed)", "tokens/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99"]
        rows = [[row["system"], str(row["clients"]), f"{row['requests']} ({row['failed']})",
                 fmt_value(row["tokens_per_s"]), fmt_time(row["ttft_p50_s"]), fmt_time(row["ttft_p99_s"]),
                 fmt_time(row["itl_p50_s"]), fmt_time(row["itl_p99_s"])]
                for row in r.rows if row["model"] == model]
        out += [_table(header, rows), ""]
        c = r.floors.get(model)
        if c:
            n = c["clients"]
            out += [f"Engine ceiling (bare slot-buffer calls, no HTTP, no client): a decode step "
                    f"{fmt_time(c['step_1_s'])} for 1 row, {fmt_time(c[f'step_{n}_s'])} for {n}; prefill "
                    f"{fmt_time(c['prefill_per_token_s'])} per prompt token; mean prompt {c['mean_prompt']} and "
                    f"{c['mean_new']} new tokens → at most {c['tokens_per_s_at_most']} tokens/s batched, "
                    f"{c['batching_off_tokens_per_s_at_most']} batching off (**{c['gain_at_most']}x**); with {n} "
                    f"streams decoding, mean inter-token latency at least **{fmt_time(c['mean_itl_at_least_s'])}**.",
                    ""]
    bad = [s for s in r.systems if s.status != "ok"]
    if bad:
        out += [f"- {s.name} ({s.group}): {s.status}{': ' + s.note if s.note else ''}" for s in bad] + [""]
    return out


def _serve_chart(r: CaseResult, plt: Any) -> Any:
    models = list(dict.fromkeys(row["model"] for row in r.rows)) or [""]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for system in dict.fromkeys(row["system"] for row in r.rows if row["model"] == model):
            rows = [row for row in r.rows if row["model"] == model and row["system"] == system]
            ax.plot([row["clients"] for row in rows], [row["tokens_per_s"] or 0 for row in rows], marker="o",
                    label=system)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("generated tokens/s")
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


# -- parallel --------------------------------------------------------------------------------------

def _gib(b: Any) -> str:
    if b is None:
        return "-"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def _parallel_md(r: CaseResult) -> list[str]:
    out = ["### compile", ""]
    rows = [[row["system"], str(row.get("ranks")), row["status"] + (f": {row['note']}" if row.get("note") else ""),
             fmt_time(row.get("time_s")), _gib(row.get("peak_rss_gib", 0) * 2**30), _gib(row.get("artifact_bytes"))]
            for row in r.rows if row["stage"] == "compile"]
    out += [_table(["system", "ranks", "status", "time", "peak RSS (with its children)", "artifact"], rows), ""]
    out += ["### decode", ""]
    rows = []
    for row in r.rows:
        if row["stage"] != "decode":
            continue
        rows.append([row["system"], fmt_spread(row["tokens_per_s"], 1, " tok/s"), f"{row['vs_one_rank']:.2f}×",
                     ", ".join(_gib(b) for b in row["weight_bytes_per_rank"]),
                     ", ".join(_gib(b) for b in row["peak_rss_per_rank"]), fmt_value(row["tokens_identical"]),
                     row.get("device", "")])
    out += [_table(["system", "tokens/s (median [p10, p90])", "vs 1 rank", "weights per rank", "peak RSS per rank",
                    "tokens = 1 rank", "device"], rows), ""]
    return out


def _parallel_chart(r: CaseResult, plt: Any) -> Any:
    rows = [row for row in r.rows if row["stage"] == "decode"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    fig.suptitle(r.title, fontsize=11)
    names = [row["system"] for row in rows]
    axes[0].barh(names, [row["tokens_per_s"]["median"] for row in rows], color="#4c72b0")
    axes[0].set_xlabel("greedy decode tokens/s (median)")
    for i, row in enumerate(rows):
        w = [b / 2**30 for b in row["weight_bytes_per_rank"]]
        rss = [b / 2**30 for b in row["peak_rss_per_rank"]]
        axes[1].barh([f"{row['system']} · rank {k}" for k in range(len(w))], rss, color="#dd8452",
                     label="peak RSS" if i == 0 else None)
        axes[1].barh([f"{row['system']} · rank {k}" for k in range(len(w))], w, color="#55a868",
                      label="program weights" if i == 0 else None)
    axes[1].set_xlabel("GiB per rank")
    axes[1].legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    return fig
