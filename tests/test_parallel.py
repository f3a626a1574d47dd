"""Tensor-parallel artifacts on real ranks: 2 processes on gloo under torchrun decode the same greedy
tokens as the one-process artifact (HF Llama GQA, Qwen2, GPT-2 with its merged c_attn), each rank
holding about half of the sharded weights; the compiler's artifact check itself runs on spawned
ranks; a wrong world size or a dead rank is a clear error, never a hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import graphopt
from graphopt.errors import InputError
from tests.test_first_try import _model, _prompt

FAMILIES = ["llama", "qwen2", "gpt2"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def _examples() -> dict:
    ids = _prompt(2, 8, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp")
    out = {}
    for fam in FAMILIES:
        model = _model(fam, seed=4)
        single = graphopt.compile(model, _examples(), pipeline="cleanup,fuse,kv-cache", target="torch",
                                  out=d / f"{fam}-1", report=None)
        tp = graphopt.compile(model, _examples(), pipeline="cleanup,fuse,kv-cache,tensor-parallel(world_size=2)",
                              target="torch", out=d / f"{fam}-2", report=None)
        out[fam] = (single, tp)
    # a static cache (index_copy into the cache buffers), each rank writing its own KV heads
    static = "cleanup,fuse,kv-cache(static=true,max_len=64)"
    out["qwen2-static"] = (
        graphopt.compile(_model("qwen2", seed=4), _examples(), pipeline=static, target="torch",
                         out=d / "qwen2-static-1", report=None),
        graphopt.compile(_model("qwen2", seed=4), _examples(), pipeline=static + ",tensor-parallel(world_size=2)",
                         target="torch", out=d / "qwen2-static-2", report=None))
    # compiled with --no-verify: the compile still finds the smallest past the rank programs take
    out["llama-unverified"] = (out["llama"][0], graphopt.compile(
        _model("llama", seed=4), _examples(), target="torch", out=d / "llama-unverified-2", report=None,
        verify=False, pipeline="cleanup,fuse,kv-cache,tensor-parallel(world_size=2)"))
    # the lm_head and its tied embedding table split by vocabulary too: the same tokens
    out["llama-vocab"] = (out["llama"][0], graphopt.compile(
        _model("llama", seed=4), _examples(), target="torch", out=d / "llama-vocab-2", report=None,
        pipeline="cleanup,fuse,kv-cache,tensor-parallel(world_size=2,vocab=sharded)"))
    return d, out


def _torchrun(tmp_path, script: str, *args: str, timeout: float = 300, env: dict | None = None):
    path = tmp_path / "rank_script.py"
    path.write_text(textwrap.dedent(script))
    return subprocess.run([*TORCHRUN, str(path), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_the_artifact_check_ran_on_two_ranks(artifacts):
    _, arts = artifacts
    for fam, (single, tp) in arts.items():
        low = tp.report["lowering"]
        if fam.endswith("unverified"):
            assert low["verify"] is None and any("past >= 1" in n for n in low["notes"]), low
            continue
        assert low["verify"]["passed"] and low["verify"]["error_vs_original"] < 1e-4, (fam, low["verify"])
        assert low["files"] == ["model.rank0.pt2", "model.rank1.pt2"]
        m = tp.manifest
        assert m["tensor_parallel"]["world_size"] == 2 and m["payload"]["rank_files"] == low["files"]
        # the manifest is rank-independent: the whole model's specs
        for key in ("inputs", "outputs"):
            assert [(x["name"], x["shape"]) for x in m[key]] == [(x["name"], x["shape"]) for x in single.manifest[key]]


GENERATE = """
import json, sys, torch, torch.distributed as dist, graphopt

def weight_bytes(engine):
    return sum(t.numel() * t.element_size() for t in engine.runner.module.state_dict().values())

res = {}
for fam, single, tp in json.loads(sys.argv[1]):
    eng, ref = graphopt.load(tp), graphopt.load(single)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 128, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :2] = 0
    one = torch.randint(0, 128, (1, 5), generator=g)
    a, b = eng.generate(ids, 16, attention_mask=mask), ref.generate(ids, 16, attention_mask=mask)
    c, d = eng.generate(one, 20), ref.generate(one, 20)  # 25 of a static cache's 64 slots
    try:
        eng.generate(one, 4, temperature=0.8)
        unseeded = "no error"
    except graphopt.InputError as e:
        unseeded = str(e)
    sampled = eng.generate(ids, 8, attention_mask=mask, temperature=0.8, seed=dist.get_rank() * 0 + 5)
    res[fam] = {"batch": torch.equal(a, b), "single": torch.equal(c, d), "tokens": a[:, -16:].tolist(),
                "unseeded": unseeded, "sampled": sampled[:, -8:].tolist(),
                "rank_bytes": weight_bytes(eng), "full_bytes": weight_bytes(ref), "rank": eng.rank,
                "world_size": eng.world_size,
                "cache_heads": next(s.shape[1] for s in eng.inputs if s.name == "past_key_0"),
                "full_heads": next(s.shape[1] for s in ref.inputs if s.name == "past_key_0")}
json.dump(res, open(sys.argv[2] + f".{dist.get_rank()}", "w"))
# a finished gloo rank can still abort in the interpreter's teardown under load ("terminate called
# without an active exception", PyTorch #179291); end the way graphopt's CLI ends a rank: the exit
# handlers (graphopt's destroys the process group), then no teardown
import atexit, os
dist.barrier()
atexit._run_exitfuncs()
sys.stdout.flush()
os._exit(0)
"""


def test_two_gloo_ranks_decode_the_single_rank_tokens(artifacts, tmp_path):
    d, arts = artifacts
    pairs = [[fam, str(s.path), str(t.path)] for fam, (s, t) in arts.items()]
    res_file = tmp_path / "res.json"
    r = _torchrun(tmp_path, GENERATE, json.dumps(pairs), str(res_file))
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"res.json.{k}").read_text()) for k in range(2)]
    for fam in [*FAMILIES, "llama-vocab", "qwen2-static", "llama-unverified"]:
        r0, r1 = ranks[0][fam], ranks[1][fam]
        assert r0["batch"] and r0["single"] and r1["batch"] and r1["single"], fam
        assert r0["tokens"] == r1["tokens"]  # every rank returns the tokens
        assert r0["sampled"] == r1["sampled"]  # seeded sampling: the same draws on every rank
        assert "needs seed=" in r0["unseeded"] and "needs seed=" in r1["unseeded"]
        assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
        assert r0["cache_heads"] * 2 == r0["full_heads"]  # each rank caches its own KV heads
        # about half the weights: the sharded ones halve, embeddings / lm_head / norms stay whole
        _, tp = arts[fam]
        sharded_share = r0["rank_bytes"] / r0["full_bytes"]
        if fam.endswith("vocab"):  # everything but the norms splits
            assert 0.5 <= sharded_share < 0.51, (fam, r0["rank_bytes"], r0["full_bytes"])
        else:
            assert 0.5 < sharded_share < 0.85, (fam, r0["rank_bytes"], r0["full_bytes"])
        assert r0["rank_bytes"] == r1["rank_bytes"]


def test_cli_launch_generates_the_same_tokens(artifacts):
    _, arts = artifacts
    single, tp = arts["gpt2"]
    cmd = [sys.executable, "-m", "graphopt.cli", "generate"]
    want = subprocess.run([*cmd, str(single.path), "--ids", "5,6,7,8", "--max-new-tokens", "12", "-q"],
                          capture_output=True, text=True, timeout=120)
    # "--laun": argparse takes abbreviations; the ranks must not see it and launch again
    got = subprocess.run([*cmd, str(tp.path), "--ids", "5,6,7,8", "--max-new-tokens", "12", "-q", "--laun", "2"],
                         capture_output=True, text=True, timeout=300)
    assert want.returncode == 0 and got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.strip() == want.stdout.strip() and len(want.stdout.split(",")) == 16  # rank 0 printed once
    # a rank's usage error: its one message and exit 2, not torchrun's report of a failed child
    unseeded = subprocess.run([*cmd, str(tp.path), "--ids", "5,6", "--temperature", "0.8", "--launch", "2"],
                              capture_output=True, text=True, timeout=300)
    assert unseeded.returncode == 2 and unseeded.stderr.count("needs seed=") == 1, unseeded.stderr[-2000:]
    assert "Traceback" not in unseeded.stderr and "ChildFailedError" not in unseeded.stderr
    bad = subprocess.run([*cmd, str(tp.path), "--ids", "5,6", "--launch", "3"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "sharded over 2 ranks; use --launch 2" in bad.stderr
    plain = subprocess.run([*cmd, str(single.path), "--ids", "5,6", "--launch", "2"], capture_output=True,
                           text=True, timeout=120)
    assert plain.returncode == 2 and "is not tensor-parallel" in plain.stderr


def test_loading_outside_the_ranks_or_with_another_world_size_is_refused(artifacts, monkeypatch):
    _, arts = artifacts
    path = arts["llama"][1].path
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(InputError, match=r"sharded over 2 ranks .* not one of them .* --launch 2"):
        graphopt.load(path)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(InputError, match="sharded over 2 ranks but this process is rank 0 of 3"):
        graphopt.load(path)  # before any collective: every rank says it at once


DEAD_RANK = """
import json, os, sys, time, torch, graphopt

eng = graphopt.load(sys.argv[1])
if eng.rank == 1:
    os._exit(0)  # dies without a word, after loading
t = time.perf_counter()
try:
    eng.generate(torch.tensor([[1, 2, 3]]), 8)
    out = {"error": None}
except Exception as e:
    out = {"error": type(e).__name__, "message": str(e)}
out["seconds"] = time.perf_counter() - t
json.dump(out, open(sys.argv[2], "w"))
"""


def test_a_rank_that_dies_is_an_error_on_the_others_not_a_hang(artifacts, tmp_path):
    _, arts = artifacts
    out = tmp_path / "dead.json"
    t = time.perf_counter()
    r = _torchrun(tmp_path, DEAD_RANK, str(arts["llama"][1].path), str(out), timeout=180,
                  env={"GRAPHOPT_TP_TIMEOUT": "20"})
    assert out.is_file(), r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["error"] == "RuntimeFailure", res
    assert "a collective failed" in res["message"] and "another rank died" in res["message"]
    assert res["seconds"] < 25 and time.perf_counter() - t < 120


def test_serve_refuses_a_tensor_parallel_artifact(artifacts, capsys):
    from graphopt.cli import main

    _, arts = artifacts
    assert main(["serve", str(arts["llama"][1].path), "--port", "0"]) == 2
    assert "tensor-parallel over 2 ranks, and graphopt serve runs one process" in capsys.readouterr().err
