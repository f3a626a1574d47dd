"""The benchmark suite (bench/): the harness in-process, and the command end to end in --quick mode.

The end-to-end runs use a temporary results folder and the smallest settings: the ``compile`` case
on nanogpt only, and (slow) ``minilm`` at batch 1 x 16 tokens with 2 iterations.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.harness import (
    BASELINE,
    BenchContext,
    Candidate,
    CaseResult,
    SkipSystem,
    System,
    SystemResult,
    interleaved_rounds,
    paired_ratio,
    run_latency,
    summarize,
)
from bench.run import main
from bench.systems import unregistered_passes

REPO = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MACHINE_KEYS = {"cpu", "logical_cpus", "usable_cpus", "threads", "ram_gib", "date", "device", "gpu", "versions"}


def run_bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def check_files(out: Path, case: str) -> dict:
    for ext in ("md", "json", "png"):
        assert (out / f"{case}.{ext}").is_file(), f"{case}.{ext} missing"
    png = (out / f"{case}.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    import matplotlib.image

    assert matplotlib.image.imread(str(out / f"{case}.png")).ndim == 3  # decodes
    data = json.loads((out / f"{case}.json").read_text())
    assert MACHINE_KEYS <= set(data["machine"]), data["machine"]
    assert data["machine"]["versions"]["torch"] == torch.__version__
    assert data["machine"]["versions"]["graphopt"]
    md = (out / f"{case}.md").read_text()
    assert md.startswith("# ") and data["machine"]["cpu"] in md
    return data


# -- harness, in-process -----------------------------------------------------------------------

def test_summarize_gives_median_and_spread():
    s = summarize([float(x) for x in range(1, 11)])
    assert s["n"] == 10 and s["median"] == 5.5
    assert s["p10"] < s["p25"] < s["median"] < s["p75"] < s["p90"]
    assert s["iqr"] == pytest.approx(s["p75"] - s["p25"])
    assert summarize([]) == {"n": 0}


def test_paired_ratio_is_per_round():
    # drift doubles both systems' times in round 2: the paired ratio stays exactly 2
    r = paired_ratio([2.0, 4.0], [1.0, 2.0])
    assert r["median"] == r["p10"] == r["p90"] == 2.0


def test_rounds_are_interleaved():
    order: list[str] = []
    systems = [System(n, lambda n=n: order.append(n)) for n in "ABC"]
    times = interleaved_rounds(systems, warmup=1, iters=2, sync=lambda: None, on_error=lambda s, e: None)
    assert order == list("ABCABCABC")  # 1 warm-up round, 2 timed rounds
    assert all(len(t) == 2 for t in times.values())


def _ctx(tmp_path: Path, **kw) -> BenchContext:
    return BenchContext(threads=1, device="cpu", quick=True, workdir=tmp_path, graphopt_targets=["onnx"], **kw)


def test_run_latency_keeps_skipped_and_failed_systems(tmp_path):
    x = torch.ones(4)

    def broken() -> System:
        raise RuntimeError("no such kernel\nlong traceback text")

    def skipped() -> System:
        raise SkipSystem("pass 'fuse' not registered yet")

    candidates = [
        Candidate("base", lambda: System("base", lambda: x * 1, kind=BASELINE), BASELINE),
        Candidate("double", lambda: System("double", lambda: x * 2)),
        Candidate("broken", broken),
        Candidate("skipped", skipped),
        Candidate("excluded one", lambda: System("excluded one", lambda: x)),
    ]
    quality = lambda ref, out: {"max_abs_err": float((ref - out).abs().max())}  # noqa: E731
    results, notes = run_latency(_ctx(tmp_path, exclude=["excluded"]), candidates, quality=quality,
                                 warmup=0, iters=3, floor_s=1e-9)
    by = {r.name: r for r in results}
    assert [r.name for r in results] == [c.name for c in candidates]
    assert by["base"].status == "ok" and by["base"].speedup["median"] == 1.0
    assert by["double"].quality == {"max_abs_err": 1.0}
    assert {"median", "p10", "p90", "iqr"} <= set(by["double"].latency_s)
    assert by["double"].floor_ratio["median"] > 1
    assert by["broken"].status == "failed" and by["broken"].note == "RuntimeError: no such kernel"
    assert by["skipped"].status == "skipped" and "not registered" in by["skipped"].note
    assert by["excluded one"].status == "excluded"
    assert notes == []


def test_unregistered_passes_names_the_missing_ones():
    assert unregistered_passes("cleanup") == []
    assert unregistered_passes("cleanup,no-such-pass-xyz(k=1)") == ["no-such-pass-xyz"]


def test_report_files_from_a_synthetic_result(tmp_path):
    from bench.machine import describe
    from bench.report import write_all

    s = summarize([0.010, 0.011, 0.012])
    systems = [SystemResult("torch eager", BASELINE, "ok", group="g", latency_s=s, speedup=summarize([1.0]),
                            floor_ratio=summarize([3.0]), quality={"max_abs_err": 0.0}),
               SystemResult("graphopt x", "graphopt", "skipped", note="pass 'x' not registered yet", group="g")]
    result = CaseResult("demo", "Demo", "latency", {"batch": 1}, baselines={"g": "torch eager"}, systems=systems,
                        machine=describe(1, "cpu"))
    write_all(result, tmp_path)
    data = check_files(tmp_path, "demo")
    assert data["systems"][0]["latency_s"]["median"] == pytest.approx(0.011)
    assert "not registered yet" in (tmp_path / "demo.md").read_text()


# -- the command ---------------------------------------------------------------------------------

def test_usage_errors_exit_2(capsys):
    assert main(["--cases", "no-such-case"]) == 2
    assert main(["--set", "minilm.no_such_param=1"]) == 2
    assert main(["--set", "minilm.batch=eight"]) == 2
    assert "no parameter 'no_such_param'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_fails_cleanly(capsys):
    assert main(["--device", "cuda", "--cases", "compile"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda needs an NVIDIA GPU" in err and "Traceback" not in err


def test_compile_case_quick_on_nanogpt(tmp_path):
    proc = run_bench("--cases", "compile", "--quick", "--set", "compile.models=nanogpt", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = check_files(tmp_path, "compile")
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert ok and ok[0]["model"] == "nanogpt" and ok[0]["pipeline"] == "cleanup"
    for phase in ("capture", "passes", "verification", "lowering", "lowering_verification", "writing"):
        assert {"median", "p10", "p90"} <= set(ok[0]["phases_s"][phase])
    assert ok[0]["phases_s"]["verification"]["median"] > 0
    assert {"median", "p10", "p90"} <= set(ok[0]["verified_over_unverified"])
    assert -1 < ok[0]["verification_fraction"]["median"] < 1  # a difference of two noisy totals
    assert 0 < ok[0]["verification_fraction_phases"]["median"] < 1
    assert "verification share" in (tmp_path / "compile.md").read_text()
    assert data["elapsed_s"] > 0


@pytest.mark.slow
def test_minilm_case_quick_tiny(tmp_path):
    proc = run_bench("--cases", "minilm", "--quick", "--set", "minilm.batch=1", "--set", "minilm.seq_len=16",
                     "--exclude", "torch.compile,int8", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = check_files(tmp_path, "minilm")
    assert data["baselines"] == {"minilm": "torch eager"}
    assert data["rates"]["gemm_flops"] > 0 and data["rates"]["mem_bw"] > 0
    assert data["floors"]["minilm"]["time_s"] > 0
    by = {s["name"]: s for s in data["systems"]}
    assert by["torch.compile (inductor)"]["status"] == "excluded"
    timed = [s for s in data["systems"] if s["status"] == "ok"]
    assert {"torch eager", "ORT (torch.onnx export)", "graphopt cleanup"} <= {s["name"] for s in timed}
    for s in timed:
        assert s["latency_s"]["n"] == 2
        assert {"median", "p10", "p90", "iqr"} <= set(s["latency_s"])
        assert {"median", "p10", "p90"} <= set(s["speedup"]) and s["floor_ratio"]["median"] > 0
        assert s["quality"]["cos_worst"] > 0.9999 and s["quality"]["max_abs_err"] < 1e-3


# -- the scale case: its pieces in seconds, the whole case on a tiny model (slow) ----------------------

def test_scale_configs_are_the_real_model_shapes():
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.cases.scale import LLAMA32_1B, QWEN25_05B

    # parameter counts of Qwen2.5-0.5B and Llama-3.2-1B (tied embeddings counted once)
    for config, params in ((QWEN25_05B, 494_032_768), (LLAMA32_1B, 1_235_814_400)):
        fields = {k: v for k, v in config.items() if k != "model_type"}
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **fields))
        assert sum(p.numel() for p in model.parameters()) == params
    assert AutoConfig.for_model("llama", **{k: v for k, v in LLAMA32_1B.items() if k != "model_type"}
                                ).rope_parameters["rope_type"] == "llama3"


def test_scale_measures_a_child_and_survives_its_kill(tmp_path):
    from bench.cases.scale import run_measured

    grow = "x = bytearray(300 * 2**20); import time; time.sleep(0.5)"
    ok = run_measured([sys.executable, "-c", grow], tmp_path / "ok.log", timeout_s=60)
    assert ok.ok and ok.peak_rss_bytes >= 300 * 2**20 and ok.samples
    killed = run_measured([sys.executable, "-c", grow + "; import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                          tmp_path / "killed.log", timeout_s=60)
    assert killed.returncode == -9 and killed.peak_rss_bytes >= 300 * 2**20
    assert "killed by signal 9" in killed.failure() and "GiB peak RSS" in killed.failure()
    slow = run_measured([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "slow.log", timeout_s=0.5)
    assert slow.timed_out and not slow.ok and "timed out" in slow.failure()
    capped = run_measured([sys.executable, "-c", grow], tmp_path / "capped.log", timeout_s=60, max_rss_gib=0.1)
    assert capped.capped == 0.1 and not capped.ok and "past the 0.1 GiB cap" in capped.failure()
    # tree=True: a process's children count too (the tensor-parallel check's rank processes)
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grow!r}])"
    alone = run_measured([sys.executable, "-c", parent], tmp_path / "alone.log", timeout_s=60)
    tree = run_measured([sys.executable, "-c", parent], tmp_path / "tree.log", timeout_s=60, tree=True)
    assert alone.peak_rss_bytes < 200 * 2**20 <= 300 * 2**20 <= tree.peak_rss_bytes


def test_scale_reads_phases_when_report_json_has_them(tmp_path):
    from bench.cases.scale import _graphopt_report

    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text(json.dumps({"verification": {"passed": True,
                                                                    "lowering_error_vs_original": 1e-6}}))
    (art / "report.json").write_text(json.dumps({"passes": [{"spec": "cleanup", "time_s": 1.5}],
                                                 "lowering": {"time_s": 2.0}}))
    old = _graphopt_report(art)
    assert old["phases"] == [{"phase": "pass:cleanup", "time_s": 1.5}, {"phase": "lower", "time_s": 2.0}]
    assert old["verified"] is True
    phases = [{"phase": "capture", "time_s": 3.0, "rss_gib": 2.5, "peak_rss_gib": 4.0, "extra": 1}]
    (art / "report.json").write_text(json.dumps({"phases": phases, "memory": {"peak_rss_gib": 4.0}}))
    new = _graphopt_report(art)
    assert new["phases"] == [{"phase": "capture", "time_s": 3.0, "rss_gib": 2.5, "peak_rss_gib": 4.0}]
    assert new["reported_peak_rss_gib"] == 4.0


def test_scale_floor_is_bandwidth_over_bytes_per_token():
    from bench.cases.scale import QWEN25_05B, decode_floor

    linear_body, linear_head = 357_826_560, 136_134_656  # Qwen2.5-0.5B: layers' linears; the tied lm_head
    info = {"linear_body": linear_body, "linear_head": linear_head,
            "weight_bytes": 4 * (linear_body + linear_head) + 4 * 100_000}
    rates = {"gemm_flops": 1e15, "mem_bw": 1e10}  # memory-bound by far
    fl = decode_floor(info, QWEN25_05B, 16, 64, rates, int4=False)
    per_token = 4 * (linear_body + linear_head) + 4 * 100_000
    assert fl["bound"] == "memory" and fl["forwards"] == 64
    assert fl["tokens_per_s"] == pytest.approx(1e10 / per_token, rel=0.01)  # the KV cache adds < 1 %
    int4 = decode_floor(info, QWEN25_05B, 16, 64, rates, int4=True)
    assert int4["tokens_per_s"] > 5 * fl["tokens_per_s"]


def test_scale_report_from_a_synthetic_result(tmp_path):
    from bench.report import write_all

    r = CaseResult("scale", "scale title", "scale", {"models": {"m": "M shape"}, "parameters": {"m": 1_000_000},
                                                     "checkpoint_bytes": {"m": 4_000_000}})
    r.rows = [
        {"model": "m", "system": "graphopt cleanup", "kind": "graphopt", "stage": "compile", "status": "ok",
         "note": "", "time_s": 12.0, "peak_rss_gib": 1.5, "artifact_bytes": 4_100_000, "verified": True,
         "phases": [{"phase": "capture", "time_s": 3.0, "rss_gib": 1.0, "peak_rss_gib": 1.2}],
         "rss_samples": [[0.1, 0.5], [0.2, 1.5]]},
        {"model": "m", "system": "onnxruntime-genai builder fp32", "kind": "peer", "stage": "compile",
         "status": "failed", "note": "killed by signal 9 (SIGKILL: out of memory?) at 9.00 GiB peak RSS",
         "time_s": 30.0, "peak_rss_gib": 9.0},
    ]
    r.systems = [SystemResult("HF generate (KV cache)", BASELINE, "ok", group="m · fp32", samples_s=[0.5, 0.6],
                              latency_s=summarize([0.5, 0.6]), speedup=summarize([1.0, 1.0]),
                              throughput={"unit": "tokens/s", "median": 110.0, "p10": 100.0, "p90": 120.0})]
    r.baselines = {"m · fp32": "HF generate (KV cache)"}
    write_all(r, tmp_path)
    md = (tmp_path / "scale.md").read_text()
    assert "## m: M shape, 1.0M parameters" in md and "killed by signal 9" in md and "9.00 GiB" in md
    assert "Phases of `graphopt cleanup`" in md and "## m · fp32" in md and "110.0" in md
    assert (tmp_path / "scale.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.slow
def test_scale_case_quick_on_the_tiny_model(tmp_path):
    proc = run_bench("--cases", "scale", "--quick", "--set", "scale.models=tiny", "--set", "scale.pipeline=cleanup",
                     "--set", "scale.int4_pipeline=cleanup,quantize(scheme=int4-weight)", "--exclude", "torch.export",
                     "--out", str(tmp_path), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = check_files(tmp_path, "scale")
    rows = {r["system"]: r for r in data["rows"]}
    for name in ("checkpoint: build + save_pretrained", "graphopt checkpoint load", "graphopt cleanup"):
        assert rows[name]["status"] == "ok" and rows[name]["peak_rss_gib"] > 0.05, rows[name]
    assert rows["graphopt cleanup"]["verified"] is True and rows["graphopt cleanup"]["artifact_bytes"] > 0
    assert rows["graphopt cleanup"]["phases"]
    assert rows["torch.export + torch.onnx.export"]["status"] == "excluded"
    timed = {s["name"]: s for s in data["systems"] if s["status"] == "ok"}
    assert {"HF generate (KV cache)", "graphopt cleanup"} <= set(timed)
    assert timed["graphopt cleanup"]["quality"]["token_agreement"] == 1.0
    assert timed["graphopt cleanup"]["throughput"]["median"] > 0
    assert data["floors"]["tiny · fp32"]["tokens_per_s"] > 0


def test_parallel_case_quick_on_the_tiny_model(tmp_path):
    """The parallel case end to end on the tiny Qwen2: three compiles, 1 rank and two 2-rank variants
    decoded under torchrun, the same tokens, less weight per rank (half with the vocabulary split)."""
    proc = run_bench("--cases", "parallel", "--quick", "--out", str(tmp_path), timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = check_files(tmp_path, "parallel")
    assert [r["status"] for r in data["rows"] if r["stage"] == "compile"] == ["ok"] * 3
    decode = [r for r in data["rows"] if r["stage"] == "decode"]
    assert [r["ranks"] for r in decode] == [1, 2, 2] and all(r["tokens_identical"] for r in decode)
    one, two, vocab = (r["weight_bytes_per_rank"] for r in decode)
    assert len(two) == 2 and two[0] < one[0] and vocab[0] <= 0.51 * one[0]
    assert all(r["tokens_per_s"]["median"] > 0 for r in decode)


def test_serve_case_quick_on_the_trained_decoder(tmp_path):
    """The serve case end to end: a real server with and without batching (slot buffers and the
    appended cache), HF generate per request, every request answered, the four systems measured at
    each level."""
    proc = run_bench("--cases", "serve", "--quick", "--out", str(tmp_path), timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = check_files(tmp_path, "serve")
    assert [s["status"] for s in data["systems"]] == ["ok"] * 4, data["systems"]
    rows = data["rows"]
    assert len(rows) == 4 * 2  # four systems at 1 and 4 clients
    for row in rows:
        assert row["failed"] == 0 and row["tokens"] > 0 and row["tokens_per_s"] > 0, row
        assert row["ttft_p50_s"] > 0 and row["itl_p50_s"] > 0
    assert any("clients:" in n for n in data["notes"])
    ceiling = data["floors"]["shakespeare"]  # the engine alone, bare calls
    assert ceiling["clients"] == 4 and 0 < ceiling["step_1_s"] and ceiling["prefill_per_token_s"] > 0
    assert ceiling["gain_at_most"] > 0 and ceiling["mean_itl_at_least_s"] > 0
    assert "Engine ceiling" in (tmp_path / "serve.md").read_text()


def test_speculative_case_quick_on_the_trained_decoder(tmp_path):
    """The speculative case end to end on the trained decoder: every system built and timed,
    graphopt's speculation gives the baseline's tokens, acceptance recorded."""
    proc = run_bench("--cases", "speculative", "--quick", "--set", "speculative.prompts=open", "--out", str(tmp_path),
                     timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = check_files(tmp_path, "speculative")
    systems = {s["name"]: s for s in data["systems"]}
    assert all(s["status"] == "ok" for s in systems.values()), [(s["name"], s["note"]) for s in data["systems"]]
    spec = [s for n, s in systems.items() if n.startswith("graphopt ") and "plain" not in n]
    assert len(spec) >= 2 and all(s["quality"]["token_agreement"] == 1.0 for s in spec)
    assert all("acceptance" in s["info"] for s in spec)
    ceiling = {row["drafter"]: row for row in data["rows"] if row["group"] == "shakespeare · open"}
    for label in ("prompt lookup", "trained 1-layer draft"):
        d = ceiling[label]
        assert d["ceiling"] >= d["fixed"] > 0 and 1 <= d["target_calls"] <= 16 and d["target_call_ms_1"] > 0, d
    assert "Ceiling of any speculative loop" in (tmp_path / "speculative.md").read_text()


def test_speculative_replay_bounds_what_drafting_can_gain():
    """The speculative case's ceiling: lossless speculation replayed over the target's own tokens,
    priced by call costs. A drafter that is always right checks every token in one call; one that
    is never right gains nothing (the oracle falls back to plain steps); draft calls are charged."""
    from bench.cases.speculative import _replay

    seq, p0 = [1, 2, 3, 4, 5, 6, 7, 8], 3  # a prompt of 3, then 5 tokens (the first from the prefill)
    flat = {s: 1.0 for s in range(1, 10)}  # a call costs the same for any number of tokens
    right = _replay(seq, p0, flat, lambda m: flat[m + 1], lambda i, k: seq[i:i + k], kmax=8)
    assert right["ceiling"] == 4.0 and right["target_calls"] == 1 and right["fixed"] == 4.0
    assert right["acceptance"] == 1.0
    wrong = _replay(seq, p0, flat, lambda m: flat[m + 1], lambda i, k: [-1] * k, kmax=8)
    assert wrong["ceiling"] == 1.0 and wrong["target_calls"] == 4 and wrong["fixed"] == 1.0
    assert wrong["acceptance"] == 0.0
    drafted = _replay(seq, p0, flat, lambda m: 1.0 + 0.5 * m, lambda i, k: seq[i:i + k], kmax=8)
    assert drafted["fixed"] == 1.6 and drafted["k"] == 3  # 3 draft calls, one check keeps them + its own


def test_busy_note_names_what_else_took_the_cpus():
    """The note on noisy timings comes from CPU time, not the load average at the end (which counts
    the case's own threads and servers): the machine's busy time less the bench's own is what other
    processes took; steal time is what the hypervisor took."""
    from bench.machine import busy_note, cpu_during, cpu_seconds

    before = {"busy_s": 100.0, "steal_s": 5.0, "ours_s": 10.0, "wall_s": 50.0}
    after = {"busy_s": 130.0, "steal_s": 7.0, "ours_s": 30.0, "wall_s": 60.0}  # 10 s: 3 CPUs busy, 2 ours
    during = cpu_during(before, after)
    assert during == {"bench_cpus": 2.0, "other_cpus": 1.0, "steal_cpus": 0.2}
    note = busy_note({"usable_cpus": 2, "cpu_during_case": during})
    assert "other processes used 1.0 of the 2 CPUs" in note and "steal" in note
    quiet = cpu_during(before, {**after, "busy_s": 120.0, "steal_s": 5.0})
    assert busy_note({"usable_cpus": 2, "cpu_during_case": quiet, "load_average_at_end": [6.7, 3, 2]}) is None
    assert busy_note({"usable_cpus": 2, "load_average_at_start": [3.5, 2, 1]}).startswith("the machine was busy")
    assert cpu_during(None, after) is None
    reading = cpu_seconds()
    assert reading is None or {"busy_s", "steal_s", "ours_s", "wall_s"} <= set(reading)
