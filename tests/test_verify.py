"""graphopt.verify: policies on crafted outputs, metrics with known answers, verification inputs,
the float64 reference run and first-divergence search."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import graphopt
from graphopt.capture import capture
from graphopt.verify import metrics
from graphopt.verify.policies import Evidence, Outcome, max_abs_error
from graphopt.verify.verifier import Verifier, first_divergence, make_verification_inputs, run_float64

aten = torch.ops.aten
NAN, INF = float("nan"), float("inf")


def ev(original, candidate, names=None, **kw) -> Evidence:
    """Evidence for one input set; ``original`` / ``candidate`` are lists of output tensors."""
    names = names or [f"out{i}" for i in range(len(original))]
    return Evidence(output_names=names, original=[list(original)], candidate=[list(candidate)], **kw)


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def ulp_up(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.full_like(x, INF))


# -- exact -----------------------------------------------------------------------------------------
def test_exact_passes_identical_outputs():
    x = torch.randn(3, 4)
    out = graphopt.verify.exact().check(ev([x, torch.arange(3)], [x.clone(), torch.arange(3)]))
    assert out.passed and out.figures["max_abs_error"] == 0.0


def test_exact_fails_on_a_one_ulp_change():
    x = torch.randn(3, 4)
    y = x.clone()
    y[1, 2] = ulp_up(y[1, 2])
    out = graphopt.verify.exact().check(ev([x], [y], names=["logits"]))
    assert not out.passed
    assert out.worst_output == "logits" and "not bit-identical" in out.message
    assert 0 < out.figures["max_abs_error"] < 1e-6


def test_exact_fails_on_dtype_or_shape_change():
    x = torch.randn(3)
    assert not graphopt.verify.exact().check(ev([x], [x.double()])).passed
    assert not graphopt.verify.exact().check(ev([x], [x[:2]])).passed


def test_exact_treats_nan_in_both_as_equal_but_not_nan_against_a_number():
    exact = graphopt.verify.exact()
    assert exact.check(ev([t(NAN, 1.0)], [t(NAN, 1.0)])).passed
    assert not exact.check(ev([t(NAN, 1.0)], [t(0.0, 1.0)])).passed
    assert not exact.check(ev([t(0.0, 1.0)], [t(NAN, 1.0)])).passed


def test_exact_keeps_infinities_apart_from_finite_values():
    big = torch.finfo(torch.float32).max
    exact = graphopt.verify.exact()
    assert exact.check(ev([t(INF, -INF)], [t(INF, -INF)])).passed
    assert not exact.check(ev([t(INF)], [t(big)])).passed


def test_exact_integer_outputs():
    exact = graphopt.verify.exact()
    assert exact.check(ev([t(1, 2, dtype=torch.int64)], [t(1, 2, dtype=torch.int64)])).passed
    assert not exact.check(ev([t(1, 2, dtype=torch.int64)], [t(1, 3, dtype=torch.int64)])).passed


# -- allclose --------------------------------------------------------------------------------------
def test_allclose_boundary_is_inclusive():
    # bound = atol + rtol * |orig| = 0.25 + 0.5 * 1.0 = 0.75, all exactly representable
    policy = graphopt.verify.allclose(rtol=0.5, atol=0.25)
    assert policy.check(ev([t(1.0)], [t(1.75)])).passed
    assert policy.check(ev([t(1.0)], [t(0.25)])).passed
    out = policy.check(ev([t(1.0)], [ulp_up(t(1.75))], names=["y"]))
    assert not out.passed and out.worst_output == "y" and "exceeds" in out.message
    assert policy.tolerance() == (0.5, 0.25)
    assert policy.describe() == "allclose(rtol=0.5, atol=0.25)"


def test_allclose_tolerance_is_relative_to_the_original():
    policy = graphopt.verify.allclose(rtol=0.5, atol=0.0)
    assert policy.check(ev([t(4.0)], [t(6.0)])).passed       # |d| = 2 <= 0.5 * 4
    assert not policy.check(ev([t(2.0)], [t(4.0)])).passed   # |d| = 2 >  0.5 * 2 (not 0.5 * 4)


def test_allclose_nan_and_inf_handling():
    policy = graphopt.verify.allclose()
    assert policy.check(ev([t(NAN, INF, 1.0)], [t(NAN, INF, 1.0)])).passed
    assert not policy.check(ev([t(NAN, 1.0)], [t(1.0, 1.0)])).passed
    assert not policy.check(ev([t(1.0)], [t(NAN)])).passed
    assert not policy.check(ev([t(INF)], [t(-INF)])).passed
    assert not policy.check(ev([t(INF)], [t(1e30)])).passed


def test_allclose_integer_outputs_must_be_equal():
    policy = graphopt.verify.allclose(rtol=1.0, atol=1.0)
    ints = t(1, 2, dtype=torch.int64)
    assert policy.check(ev([ints], [ints.clone()])).passed
    out = policy.check(ev([ints], [t(1, 3, dtype=torch.int64)], names=["ids"]))
    assert not out.passed and "integer output 'ids'" in out.message


def test_allclose_reports_the_worst_output():
    policy = graphopt.verify.allclose(rtol=0, atol=1e-3)
    out = policy.check(ev([t(1.0), t(1.0)], [t(1.0), t(1.1)], names=["a", "b"]))
    assert not out.passed and out.worst_output == "b"
    assert out.figures["max_abs_error"] == pytest.approx(0.1, rel=1e-5)


# -- reference (fp64) ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def matmul_case():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 512, generator=g), torch.randn(512, 32, generator=g)
    ref = a.double() @ b.double()
    orig = a @ b                       # fp32: accumulation error vs the fp64 reference
    assert float((orig.double() - ref).abs().max()) > 0
    return ref, orig


def test_reference_passes_the_fp64_result_rounded_to_fp32(matmul_case):
    ref, orig = matmul_case
    policy = graphopt.verify.reference(tol=1e-9)
    out = policy.check(ev([orig], [ref.float()], reference64=lambda: [[ref]]))
    assert out.passed, out.message
    assert out.figures["rmse_vs_fp64_candidate"] <= out.figures["rmse_vs_fp64_original"]


def test_reference_fails_ten_times_the_original_error(matmul_case):
    ref, orig = matmul_case
    worse = (ref + 10 * (orig.double() - ref)).float()
    out = graphopt.verify.reference(tol=1e-9).check(ev([orig], [worse], names=["y"], reference64=lambda: [[ref]]))
    assert not out.passed and out.worst_output == "y" and ">" in out.message
    ratio = out.figures["rmse_vs_fp64_candidate"] / out.figures["rmse_vs_fp64_original"]
    assert ratio == pytest.approx(10, rel=0.05)
    # the multiplier is what lets it through
    assert graphopt.verify.reference(tol=1e-9, multiplier=11).check(
        ev([orig], [worse], reference64=lambda: [[ref]])).passed


def test_reference_without_fp64_run_falls_back_to_allclose_and_says_so():
    policy = graphopt.verify.reference(tol=1e-3)
    assert policy.needs_reference64
    out = policy.check(ev([t(1.0)], [t(1.0005)]))
    assert out.passed
    assert "fp64 reference unavailable" in out.message and "allclose(rtol=0.0001" in out.message
    assert out.figures["fp64_reference"] == 0.0          # reaches report.json
    assert "no fp64 run" in policy.label()               # reaches the report table and the CLI line
    assert not policy.check(ev([t(1.0)], [t(1.01)])).passed


def test_reference_fallback_names_why_the_fp64_run_failed_and_follows_the_dtype():
    def broken():
        raise RuntimeError("aten::foo has no float64 kernel\n(long C++ trace)")

    policy = graphopt.verify.reference()
    x = torch.linspace(-2, 2, 64)
    out = policy.check(ev([x], [x * (1 + 5e-5)], reference64=broken))
    assert out.passed and "RuntimeError: aten::foo has no float64 kernel" in out.message
    assert "(long C++ trace)" not in out.message
    assert not policy.check(ev([x], [x * 1.001], reference64=broken)).passed          # fp32: 1e-4
    h = x.half()
    assert policy.check(ev([h], [(x * 1.005).half()], reference64=lambda: None)).passed   # fp16: 1e-2
    assert "float16" in policy.label()
    assert not policy.check(ev([h], [(x * 1.05).half()], reference64=lambda: None)).passed
    # a later check with an fp64 run clears the fallback from the label
    assert policy.check(ev([x], [x], reference64=lambda: [[x.double()]])).passed
    policy.check(ev([x], [x + 1e-7], reference64=lambda: [[x.double()]]))
    assert "no fp64 run" not in policy.label()


# -- reference: the fp64 rule on crafted errors ----------------------------------------------------
SIGMA = 1e-5  # the "original's own error" of these cases, far above fp32 rounding of values ~1


def _around(ref: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """An fp32 output whose error against ``ref`` is Gaussian noise of std ``sigma``."""
    g = torch.Generator().manual_seed(seed)
    return (ref + sigma * torch.randn(ref.shape, generator=g, dtype=torch.float64)).float()


@pytest.fixture(scope="module")
def hidden():
    """``[B, T, H]`` hidden states in fp64 (the reference), the size of a small model's output."""
    return torch.randn(8, 32, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_reference_passes_noise_the_size_of_the_originals_own(hidden):
    orig, cand = _around(hidden, SIGMA, 1), _around(hidden, 1.5 * SIGMA, 2)
    out = graphopt.verify.reference().check(ev([orig], [cand], names=["h"], reference64=lambda: [[hidden]]))
    assert out.passed, out.message
    assert "within 3 x the original's own" in out.message and out.figures["bound_ratio"] < 1
    # the same pair fails a fixed allclose: the false alarm the fp64 rule removes
    assert not graphopt.verify.allclose(rtol=1e-5, atol=1e-5).check(ev([orig], [cand])).passed


def test_reference_max_rule_catches_an_error_in_one_row_that_the_rms_dilutes(hidden):
    """A dropped mask in one padded sentence, one wrong head: few elements, far off."""
    orig, cand = _around(hidden, SIGMA, 1), _around(hidden, SIGMA, 2)
    cand[3, 7] += 20 * SIGMA                     # one token's 64 values of 16384
    out = graphopt.verify.reference().check(ev([orig], [cand], names=["h"], reference64=lambda: [[hidden]]))
    assert not out.passed and out.worst_output == "h"
    f = out.figures
    assert f["rmse_vs_fp64_candidate"] <= 3 * f["rmse_vs_fp64_original"]    # an RMS rule alone would pass it
    assert f["max_vs_fp64_candidate"] > f["max_bound"] and "max " in out.message and ">" in out.message


def test_reference_rms_rule_catches_a_small_error_spread_over_everything(hidden):
    """An attention scale off by 1e-3: every element a little off, none far."""
    orig, cand = _around(hidden, SIGMA, 1), (_around(hidden, SIGMA, 2).double() + 4 * SIGMA).float()
    out = graphopt.verify.reference().check(ev([orig], [cand], names=["h"], reference64=lambda: [[hidden]]))
    assert not out.passed
    f = out.figures
    assert f["max_vs_fp64_candidate"] <= f["max_bound"]                       # a max rule alone would pass it
    assert f["rmse_vs_fp64_candidate"] > f["rms_bound"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_follows_the_graphs_dtype_by_itself(dtype):
    """A half-precision original is ~1e-3 off fp64 itself: a reassociated half GEMM passes the same
    rule (a fixed fp32 tolerance would fail it) and a 2% error still fails."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 256, generator=g).to(dtype), torch.randn(256, 32, generator=g).to(dtype)
    ref = a.double() @ b.double()
    orig = a @ b
    split = a[:, :128] @ b[:128] + a[:, 128:] @ b[128:]                    # sums in another order
    policy = graphopt.verify.reference()
    out = policy.check(ev([orig], [split], reference64=lambda: [[ref]]))
    assert out.passed, out.message
    assert not graphopt.verify.allclose(rtol=1e-4, atol=1e-5).check(ev([orig], [split])).passed
    assert not policy.check(ev([orig], [(orig.double() * 1.02).to(dtype)], reference64=lambda: [[ref]])).passed


def test_reference_small_outputs_get_a_wider_k():
    """Two logits: their own error is a noisy estimate (two samples), so k grows by sqrt(64/2)."""
    ref = torch.tensor([1.0, -2.0], dtype=torch.float64)
    orig = (ref + torch.tensor([1e-5, -1e-5], dtype=torch.float64)).float()
    policy = graphopt.verify.reference()
    assert policy.check(ev([orig], [(ref + 1e-4).float()], reference64=lambda: [[ref]])).passed      # 10x
    assert not policy.check(ev([orig], [(ref + 1e-3).float()], reference64=lambda: [[ref]])).passed  # 100x
    big_ref = ref.repeat(32)                                                                        # 64 values
    big = (big_ref + torch.tensor([1e-5, -1e-5], dtype=torch.float64).repeat(32)).float()
    assert not policy.check(ev([big], [(big_ref + 1e-4).float()], reference64=lambda: [[big_ref]])).passed


def test_reference_bit_identical_outputs_need_no_fp64_run():
    def never():
        raise AssertionError("the fp64 reference must not run for bit-identical outputs")

    x = torch.randn(4, 8)
    out = graphopt.verify.reference().check(ev([x, torch.arange(3)], [x.clone(), torch.arange(3)], reference64=never))
    assert out.passed and out.message == "bit-identical" and out.figures["max_abs_error"] == 0.0


def test_reference_integer_outputs_and_non_finite_values_must_match_exactly():
    x = torch.randn(16)
    ref = [[x.double(), torch.arange(3)]]
    policy = graphopt.verify.reference()
    out = policy.check(ev([x, torch.arange(3)], [x + 1e-7, torch.tensor([0, 1, 3])], reference64=lambda: ref))
    assert not out.passed and "integer" in out.message
    nan = x.clone()
    nan[2] = NAN
    ref_nan = [[nan.double()]]
    assert policy.check(ev([nan], [nan.double().add(1e-9).float()], reference64=lambda: ref_nan)).passed
    finite = nan.clone()
    finite[2] = 0.0
    out = policy.check(ev([nan], [finite], reference64=lambda: ref_nan))
    assert not out.passed and "NaN/inf" in out.message
    assert not policy.check(ev([x], [x.clone().index_fill_(0, torch.tensor([5]), INF)],
                               reference64=lambda: [[x.double()]])).passed


def test_reference_after_a_lossy_pass_does_not_measure_against_the_unquantized_fp64(hidden):
    """After quantize/prune, ``original`` holds that pass's outputs (the verifier's baseline): their
    distance to the fp64 original is the quantization error, and 3x it would hide real bugs."""
    from types import SimpleNamespace

    quantized = _around(hidden, 1e-2, 1)                         # 1% off the fp64 original
    bug = quantized.double().add(5e-3).float()                   # a 0.5% bug after quantization
    after_quant = SimpleNamespace(meta={"lowering_check": {"against": "optimized"}})
    policy = graphopt.verify.reference()
    out = policy.check(ev([quantized], [bug], reference64=lambda: [[hidden]], candidate_ir=after_quant))
    assert not out.passed and "a lossy pass ran before" in out.message and out.figures["fp64_reference"] == 0.0
    assert policy.check(ev([quantized], [bug], reference64=lambda: [[hidden]])).passed   # what the fp64 rule would say


def test_reference_on_a_float64_graph_has_no_more_exact_reference():
    x = torch.randn(64, dtype=torch.float64)
    policy = graphopt.verify.reference()
    out = policy.check(ev([x], [x * (1 + 1e-13)], reference64=lambda: [[x]]))
    assert out.passed and "computes in float64 already" in out.message and "allclose(rtol=1e-10" in out.message
    assert not policy.check(ev([x], [x * (1 + 1e-6)], reference64=lambda: [[x]])).passed


def test_reference_rejects_nonsense_settings():
    with pytest.raises(ValueError, match="multiplier"):
        graphopt.verify.reference(multiplier=0.5)
    assert graphopt.verify.reference().describe() == "reference(multiplier=3, ulps=1)"
    assert graphopt.verify.reference(tol=0.01).describe() == "reference(tol=0.01, multiplier=3, ulps=1)"


def test_exact_compares_with_the_graph_before_the_pass_when_given():
    """After a fusion (accepted by the fp64 rule), an exact pass cannot be bit-identical to the
    original; it must be bit-identical to what it was given."""
    orig, fused = torch.randn(5), None
    fused = orig + 1e-7
    e = Evidence(output_names=["y"], original=[[orig]], candidate=[[fused.clone()]], previous=[[fused]])
    out = graphopt.verify.exact().check(e)
    assert out.passed and "before the pass" in out.message
    e.candidate = [[fused + 1e-6]]
    assert not graphopt.verify.exact().check(e).passed


# -- metric ----------------------------------------------------------------------------------------
def _logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 16, generator=g)


def test_metric_cosine_bounds():
    x = _logits()
    close = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    out = graphopt.verify.metric(min_cosine=0.999).check(ev([x], [close], names=["logits"]))
    assert out.passed and out.figures["worst_cosine"] > 0.999
    out = graphopt.verify.metric(min_cosine=0.5).check(ev([x], [-x], names=["logits"]))
    assert not out.passed and "worst_cosine" in out.message and "'logits'" in out.message
    assert out.figures["worst_cosine"] == pytest.approx(-1.0)
    assert graphopt.verify.metric(min_mean_cosine=0.999).check(ev([x], [close])).passed


def test_metric_top1_bounds():
    # 4 rows of 3 classes; candidate agrees on the argmax of 3 rows
    a = t(3, 0, 0, 0, 3, 0, 0, 0, 3, 3, 0, 0).reshape(4, 3)
    b = t(2, 1, 0, 0, 2, 1, 0, 1, 2, 0, 5, 0).reshape(4, 3)
    assert graphopt.verify.metric(min_top1=0.75).check(ev([a], [b])).passed
    out = graphopt.verify.metric(min_top1=0.8).check(ev([a], [b]))
    assert not out.passed and out.figures["top1_agreement"] == 0.75


def test_metric_looks_at_the_named_output_and_custom_fn():
    x = _logits()
    noise = torch.zeros(2)
    policy = graphopt.verify.metric(min_cosine=0.99, output="logits")
    assert policy.check(ev([noise, x], [noise + 5, x], names=["aux", "logits"])).passed
    assert not policy.check(ev([noise, x], [noise, -x], names=["aux", "logits"])).passed

    def mse(a, b):
        return {"mse": float(((a - b) ** 2).mean())}

    custom = graphopt.verify.metric(fn=mse, bounds={"mse": (None, 0.01)})
    assert custom.check(ev([x], [x + 0.05])).passed
    out = custom.check(ev([x], [x + 0.5]))
    assert not out.passed and out.figures["mse"] == pytest.approx(0.25, rel=1e-4)


# -- equivalence -----------------------------------------------------------------------------------
def test_equivalence_with_bool_tuple_dict_and_outcome_results():
    seen = []

    def fn_bool(orig_ir, cand_ir, inputs):
        seen.append((orig_ir, cand_ir, inputs))
        return True

    e = Evidence(output_names=["y"], original=[], candidate=[], original_ir="O", candidate_ir="C", inputs=[["i"]])
    out = graphopt.verify.equivalence(fn_bool).check(e)
    assert out.passed and out.message == "fn_bool" and seen == [("O", "C", [["i"]])]
    assert not graphopt.verify.equivalence(lambda *a: False, "same tokens").check(e).passed
    assert graphopt.verify.equivalence(lambda *a: False, "same tokens").check(e).message == "same tokens"

    out = graphopt.verify.equivalence(lambda *a: (False, "token 3 differs")).check(e)
    assert not out.passed and out.message == "token 3 differs"

    out = graphopt.verify.equivalence(lambda *a: {"passed": True, "message": "ok", "tokens": 8, "x": "s"}).check(e)
    assert out.passed and out.message == "ok" and out.figures == {"tokens": 8}
    assert not graphopt.verify.equivalence(lambda *a: {"message": "no verdict"}).check(e).passed

    custom = Outcome(False, "custom")
    assert graphopt.verify.equivalence(lambda *a: custom).check(e) is custom
    assert graphopt.verify.equivalence(fn_bool).describe() == "equivalence(fn_bool)"


def test_max_abs_error_finds_worst_output_and_nan():
    err, where = max_abs_error([[t(1.0), t(1.0)]], [[t(1.5), t(3.0)]], ["a", "b"])
    assert (err, where) == (2.0, "b")
    err, where = max_abs_error([[t(1.0), t(1.0)]], [[t(NAN), t(3.0)]], ["a", "b"])
    assert math.isnan(err) and where == "a"
    assert max_abs_error([[t(NAN)]], [[t(NAN)]], ["a"])[0] == 0.0
    assert max_abs_error([[t(1.0)]], [[t(1.0, 2.0)]], ["a"]) == (math.inf, "a")


# -- metrics ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [2, 7, 1000])
def test_perplexity_of_uniform_logits_is_the_vocab_size(vocab):
    logits = torch.full((2, 5, vocab), 3.25)
    targets = torch.randint(0, vocab, (2, 5), generator=torch.Generator().manual_seed(0))
    assert abs(metrics.perplexity(logits, targets) - vocab) < 1e-9


def test_perplexity_of_a_confident_correct_model_is_about_one():
    targets = torch.tensor([[1, 0, 2]])
    logits = torch.nn.functional.one_hot(targets, 3).float() * 50
    assert metrics.perplexity(logits, targets) == pytest.approx(1.0, abs=1e-12)


def test_token_cosine_known_answers():
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    same = metrics.token_cosine(x, x.clone())
    assert same["worst"] == pytest.approx(1.0, abs=1e-12) and same["mean"] == pytest.approx(1.0, abs=1e-12)
    neg = metrics.token_cosine(x, -x)
    assert neg["worst"] == pytest.approx(-1.0, abs=1e-12) and neg["mean"] == pytest.approx(-1.0, abs=1e-12)
    # one orthogonal row among four identical ones
    a = torch.eye(4)
    b = a.clone()
    b[0] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    cos = metrics.token_cosine(a, b)
    assert cos["worst"] == pytest.approx(0.0) and cos["mean"] == pytest.approx(0.75)
    assert metrics.token_cosine(torch.zeros(2, 3), torch.zeros(2, 3)) == {"worst": 1.0, "mean": 1.0}


def test_top1_agreement_fraction():
    a = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.5, 0.4]])
    b = torch.tensor([[0.8, 0.2], [0.9, 0.1], [0.7, 0.3], [0.1, 0.9], [0.1, 0.2]])
    assert metrics.top1_agreement(a, b) == pytest.approx(3 / 5)
    assert metrics.top1_agreement(a, a) == 1.0
    assert metrics.top1_agreement(a.reshape(1, 5, 2), b.reshape(1, 5, 2)) == pytest.approx(3 / 5)


# -- verification inputs ---------------------------------------------------------------------------
class LMish(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)

    def forward(self, input_ids, attention_mask, features):
        return self.emb(input_ids) * attention_mask[..., None] + features


@pytest.fixture(scope="module")
def lm_ir():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 20, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    feats = torch.randn(2, 6, 8, generator=g) * 0.1 + 3.0
    rng = {0: (1, 4), 1: (2, 12)}
    return capture(LMish(), {"input_ids": ids, "attention_mask": mask, "features": feats},
                   dynamic={"input_ids": rng, "attention_mask": rng, "features": rng})


def test_verification_inputs_start_with_the_example_set(lm_ir):
    sets = make_verification_inputs(lm_ir, n_random=2)
    assert len(sets) == 3
    assert all(a is b for a, b in zip(sets[0], lm_ir.example_inputs))


def test_random_sets_vary_dynamic_dims_within_range_and_share_labels(lm_ir):
    sets = make_verification_inputs(lm_ir, n_random=3)
    ex_ids = lm_ir.example_inputs[0]
    seen_shapes = set()
    for ids, mask, feats in sets[1:]:
        assert ids.shape == mask.shape == feats.shape[:2]          # "batch" and "seq" are shared
        assert feats.shape[2] == 8                                  # static dim untouched
        b, s = ids.shape
        assert 1 <= b <= 4 and 2 <= s <= 12
        assert (b, s) != tuple(ex_ids.shape)
        seen_shapes.add((b, s))
        assert [x.dtype for x in (ids, mask, feats)] == [torch.int64, torch.int64, torch.float32]
    assert all(s[1] != ex_ids.shape[1] for s in seen_shapes)


def test_random_sets_keep_value_kinds(lm_ir):
    sets = make_verification_inputs(lm_ir, n_random=2, seed=3)
    ex_ids, _, ex_feats = lm_ir.example_inputs
    for ids, mask, feats in sets[1:]:
        assert int(ids.min()) >= int(ex_ids.min()) and int(ids.max()) <= int(ex_ids.max())  # token-like
        assert set(mask.unique().tolist()) <= {0, 1}                                          # mask-like
        assert feats.abs().sum() > 0 and not torch.equal(feats, torch.zeros_like(feats))
        assert float(feats.mean()) == pytest.approx(float(ex_feats.mean()), abs=0.1)
        assert lm_ir.run([ids, mask, feats])[0].shape == (*ids.shape, 8)
    assert any(not torch.equal(a, b) for a, b in zip(sets[1], sets[2]))


def test_random_sets_are_deterministic_per_seed(lm_ir):
    a = make_verification_inputs(lm_ir, n_random=1, seed=7)[1]
    b = make_verification_inputs(lm_ir, n_random=1, seed=7)[1]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_large_models_verify_on_one_small_random_set(lm_ir, monkeypatch):
    """Every check is a forward of the whole model per set: from LARGE_MODEL_PARAMS on, the example
    is not rerun and the random set stays one size step from it (and a rebase keeps the plan)."""
    from graphopt.verify import verifier as vmod

    assert vmod.verification_plan(lm_ir, 1) == {"include_example": True, "step": 3, "n_random": 1, "large": False,
                                                "halve_long_dims": False, "long_dim_divisor": 2}
    monkeypatch.setattr(vmod, "LARGE_MODEL_PARAMS", 1)
    plan = vmod.verification_plan(lm_ir, 1)
    assert plan["large"] and not plan["include_example"] and plan["step"] == 1
    sets = make_verification_inputs(lm_ir, n_random=1, include_example=False, step=1)
    assert len(sets) == 1 and tuple(sets[0][0].shape) == (3, 7)        # example (2, 6): one step up
    v = Verifier(lm_ir, sets, plan)
    v.rebase(lm_ir.copy())
    assert len(v.input_sets) == 1 and tuple(v.input_sets[0][0].shape) == (3, 7)
    text = vmod.describe_inputs(sets, lm_ir.input_names)
    assert text == "1 input set: input_ids [3, 7], attention_mask [3, 7], features [3, 7, 8]"
    # long dims (8 and up) are halved rather than stepped: a check costs about its token count
    rng = {0: (1, 4), 1: (2, 64)}
    long_ir = capture(LMish(), {"input_ids": torch.randint(10, 20, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long),
                                "features": torch.randn(2, 16, 8)},
                      dynamic={"input_ids": rng, "attention_mask": rng, "features": rng})
    plan = vmod.verification_plan(long_ir, 1)
    sets = make_verification_inputs(long_ir, n_random=1, include_example=False, step=1,
                                    halve_long_dims=plan["halve_long_dims"])
    assert tuple(sets[0][0].shape) == (3, 8)
    # from 1B parameters on, at a quarter (at least 4)
    monkeypatch.setattr(vmod, "QUARTER_LONG_DIMS_PARAMS", 1)
    plan = vmod.verification_plan(long_ir, 1)
    assert plan["long_dim_divisor"] == 4
    sets = make_verification_inputs(long_ir, n_random=1, include_example=False, step=1,
                                    halve_long_dims=plan["halve_long_dims"], long_dim_divisor=plan["long_dim_divisor"])
    assert tuple(sets[0][0].shape) == (3, 4)


def test_compile_reports_the_light_plan_on_large_models(monkeypatch, tmp_path):
    from graphopt.verify import verifier as vmod

    monkeypatch.setattr(vmod, "LARGE_MODEL_PARAMS", 1)
    events = []
    art = graphopt.compile(LMish(), {"input_ids": torch.randint(10, 20, (2, 6)),
                                     "attention_mask": torch.ones(2, 6, dtype=torch.long),
                                     "features": torch.randn(2, 6, 8)},
                           "cleanup", out=tmp_path / "a", report=None, progress=lambda e, **kw: events.append((e, kw)),
                           dynamic={n: {0: (1, 4), 1: (2, 12)} for n in ("input_ids", "attention_mask", "features")})
    text = art.report["verification"]["inputs"]
    assert ("verification_inputs", {"text": text}) in events      # the CLI prints it
    assert text.startswith("1 input set: input_ids [3, 7]") and "parameters: random sets with short dims one step" in text
    low = art.report["lowering"]["verify"]
    assert low["passed"] and low["inputs"] == [[[3, 7], [3, 7], [3, 7, 8]]]


def test_the_lowering_check_holds_no_graph(lm_ir):
    """Its references are computed before the runtime session opens, so the compile can drop the
    torch graphs (and the weights only they hold) first."""
    from graphopt.backends.onnx import OnnxBackend
    from graphopt.verify.lowering import LoweringCheck

    check = LoweringCheck(OnnxBackend(), Verifier(lm_ir, make_verification_inputs(lm_ir, n_random=1)), lm_ir)
    held = [v for v in vars(check).values() if isinstance(v, (graphopt.GraphIR, torch.nn.Module, Verifier))]
    assert held == []
    assert {(label, size) for label, size, *_ in check.probes} == {("batch", 1), ("batch", 2), ("batch", 3),
                                                                   ("seq", 2), ("seq", 3), ("seq", 4)}
    assert all(isinstance(p[3], list) for p in check.probes)


def test_large_models_compute_one_probe_reference_per_dim(lm_ir):
    """On a large model every probe reference is a full forward: only the smallest size of each
    dim gets one. A lowered program that refuses that size still has the next size run (the range
    is narrowed), and the note says it was not compared there."""
    from graphopt.backends.onnx import OnnxBackend
    from graphopt.errors import InputError
    from graphopt.verify.lowering import LoweringCheck, probe_minimum_sizes
    from graphopt.verify.verifier import verification_plan

    plan = dict(verification_plan(lm_ir), large=True)
    check = LoweringCheck(OnnxBackend(), Verifier(lm_ir, make_verification_inputs(lm_ir, n_random=1), plan), lm_ir)
    computed = {(label, size) for label, size, _, ref, _ in check.probes if ref is not None}
    assert computed == {("batch", 1), ("seq", 2)}

    class RefusesBatchOne:  # a lowered program with a torch.export guard batch != 1
        def run(self, inputs):
            if inputs[0].shape[0] == 1:
                raise InputError("batch must be at least 2")
            return [lm_ir.graph_module(*inputs)[0]]

    manifest = {"inputs": [{"shape": list(s.shape), "dynamic": {str(d): list(r) for d, r in s.dynamic.items()}}
                           for s in lm_ir.inputs]}
    narrowed = probe_minimum_sizes(RefusesBatchOne(), check, manifest)
    assert len(narrowed) == 1 and narrowed[0].startswith("batch >= 2 (the lowered program rejects batch = 1")
    assert "it runs at batch = 2 (outputs not compared there" in narrowed[0]
    assert manifest["inputs"][0]["dynamic"]["0"] == [2, 4]


def test_static_inputs_keep_their_shape():
    class F(torch.nn.Module):
        def forward(self, x, flag):
            return x * flag

    ir = capture(F(), (torch.randn(3, 4), torch.tensor([True, False, True, True])))
    (ex, ex_flag), (x, flag) = make_verification_inputs(ir, n_random=1)
    assert x.shape == ex.shape and flag.shape == ex_flag.shape and flag.dtype == torch.bool
    assert not torch.equal(x, torch.zeros_like(x))


# -- fp64 reference run ----------------------------------------------------------------------------
class SmallMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 8)

    def forward(self, x):
        return torch.softmax(self.fc2(torch.nn.functional.gelu(self.fc1(x))), dim=-1), x.sum(-1, dtype=torch.float32)


def test_run_float64_agrees_with_a_float64_eager_run():
    torch.manual_seed(0)
    m = SmallMLP().eval()
    x = torch.randn(4, 16)
    ir = capture(m, (x,))
    got = run_float64(ir, [x])
    assert got is not None and all(o.dtype == torch.float64 for o in got)
    with torch.no_grad():
        want = copy.deepcopy(m).double()(x.double())
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
    # the explicit float32 dtype argument is promoted too
    torch.testing.assert_close(got[1], x.double().sum(-1), rtol=1e-12, atol=1e-12)
    # the IR itself is left in float32
    assert ir.run([x])[0].dtype == torch.float32


# -- verifier and first divergence -----------------------------------------------------------------
def _with_add_as_sub(ir):
    c = ir.copy()
    node = next(n for n in c.graph.nodes if n.target == aten.add.Tensor)
    node.target = aten.sub.Tensor
    c.recompile()
    return c, node.name


def test_first_divergence_names_the_changed_node(lm_ir):
    broken, name = _with_add_as_sub(lm_ir)
    div = first_divergence(lm_ir, broken, list(lm_ir.example_inputs))
    assert div["node"] == name
    assert div["op"] == "aten.sub" and "differs from the original" in div["why"]
    assert div["max_abs_error"] > 1.0
    assert name in div["format"]
    assert first_divergence(lm_ir, lm_ir.copy(), list(lm_ir.example_inputs)) is None


def test_first_divergence_blames_the_node_a_failing_pass_created():
    class Chain(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x * 2) + 1

    ir = capture(Chain(), (torch.randn(3),))

    # a pass recomputes x * 2 in a new node: every named node still matches
    same = ir.copy()
    mul = next(n for n in same.graph.nodes if n.target == aten.mul.Tensor)
    with same.graph.inserting_after(mul):
        new = same.graph.call_function(aten.mul.Tensor, (same.placeholders()[0], 2))
    new.meta["graphopt_provenance"] = "recompute"
    mul.replace_all_uses_with(new)
    same.graph.erase_node(mul)
    same.recompile()
    div = first_divergence(ir, same, list(ir.example_inputs), pass_name="recompute")
    assert div["node"] == new.name and "created by 'recompute'" in div["why"]
    assert div["provenance"] == "recompute" and div["max_abs_error"] is None
    assert first_divergence(ir, same, list(ir.example_inputs)) is None

    # the new node computes x * 4 instead: relu keeps its name and is the first to differ
    wrong = ir.copy()
    mul = next(n for n in wrong.graph.nodes if n.target == aten.mul.Tensor)
    with wrong.graph.inserting_after(mul):
        new = wrong.graph.call_function(aten.add.Tensor, (mul, mul))
    relu = next(n for n in wrong.graph.nodes if n.target == aten.relu.default)
    relu.replace_input_with(mul, new)
    wrong.recompile()
    assert first_divergence(ir, wrong, [torch.ones(3)])["node"] == "relu"


def test_verifier_checks_against_the_original(lm_ir):
    sets = make_verification_inputs(lm_ir, n_random=1)
    v = Verifier(lm_ir, sets)
    outcome, rec = v.check(lm_ir.copy(), graphopt.verify.exact())
    assert outcome.passed and rec["passed"] and rec["error_vs_original"] == 0.0 and rec["input_sets"] == 2
    broken, _ = _with_add_as_sub(lm_ir)
    outcome, rec = v.check(broken, graphopt.verify.allclose())
    assert not outcome.passed and rec["error_vs_original"] > 1.0
    assert rec["policy"] == "allclose(rtol=1e-05, atol=1e-05)"
    ref = v.reference64()
    assert ref is not None and len(ref) == 2 and ref[0][0].dtype == torch.float64


# -- passes whose outputs compute the same thing need no new forward ---------------------------
class _Twice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        a = torch.relu(self.lin(x))
        b = torch.relu(self.lin(x))  # a duplicate CSE merges
        unused = x * 3  # noqa: F841 - dead code DCE drops
        return a + b


def test_computation_digest_ignores_dead_code_duplicates_and_names():
    from graphopt.instruments import computation_digest

    ir = capture(_Twice(), (torch.randn(2, 8),), {"x": {0: (1, 8)}})
    before = computation_digest(ir)
    assert before is not None
    _, out, _, _ = graphopt.optimize(ir.copy(), pipeline="eliminate-common-subexpressions,eliminate-dead-code", verify=False)
    assert out.node_count() < ir.node_count()
    assert computation_digest(out) == before
    # a changed op, or a weight written in place, is another computation
    relu = next(n for n in out.graph.nodes if n.target is torch.ops.aten.relu.default)
    relu.target = torch.ops.aten.gelu.default
    assert computation_digest(out) != before
    relu.target = torch.ops.aten.relu.default
    assert computation_digest(out) == before
    w = next(t for t in out.graph_module.parameters())
    with torch.no_grad():
        w.add_(1.0)
    assert computation_digest(out) != before


def test_cse_and_dce_reuse_the_previous_check_in_the_report():
    ir = capture(_Twice(), (torch.randn(2, 8),), {"x": {0: (1, 8)}})
    _, _, report, _ = graphopt.optimize(ir, pipeline="remove-noops,eliminate-common-subexpressions,eliminate-dead-code")
    passes = {p["name"]: p for p in report.data["passes"]}
    for name in ("eliminate-common-subexpressions", "eliminate-dead-code"):
        v = passes[name]["verify"]
        assert passes[name]["changed"] and v["passed"] and v["skipped"], (name, v)
        assert "same ops from the same inputs and weights" in v["message"]


def test_a_random_op_disables_the_shortcut():
    from graphopt.instruments import computation_digest

    class Noisy(torch.nn.Module):
        def forward(self, x):
            return x + torch.rand_like(x)

    ir = capture(Noisy(), (torch.randn(2, 8),), {"x": {0: (1, 8)}})
    assert computation_digest(ir) is None


def test_a_graph_ir_with_example_inputs_or_a_positional_pipeline_is_refused():
    """``optimize(ir, "a,b")`` used to run the default pipeline silently (the string went into
    example_inputs, which a captured graph does not take)."""
    ir = capture(_Twice(), (torch.randn(2, 8),), {"x": {0: (1, 8)}})
    with pytest.raises(graphopt.InputError, match="pass pipeline='eliminate-dead-code'"):
        graphopt.optimize(ir, "eliminate-dead-code")
    with pytest.raises(graphopt.InputError, match="carries its example inputs"):
        graphopt.optimize(ir, (torch.randn(2, 8),), pipeline="cleanup")
