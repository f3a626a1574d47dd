"""Train the small LLaMA-style decoder of ``samples/models/shakespeare.py`` on tinyshakespeare.

Reproducible (seeded), CPU only (``torch.set_num_threads(2)``, or 1 with ``--threads 1``/``auto``), bounded by a wall-clock
budget (``--budget-min``, default 20): it always stops in time and saves.

Data split, by CHARACTERS of ``../shared/data/tinyshakespeare.txt`` (UTF-8, 1,115,394
characters): ``n_train = int(0.9 * len(text)) = 1,003,854``; the training split is
``text[:n_train]`` (the first 90 %) and the held-out split is ``text[n_train:]`` (the LAST
111,540 characters). The split lives in ``samples/models/shakespeare.py`` (``split_text``) so
training and evaluation cannot disagree. Nothing from the held-out split is used for training:
the tokenizer is trained on the training split only, and the held-out loss logged during
training only monitors.

Pipeline:
1. tokenizer: byte-level BPE (``tokenizers``), ``--vocab-size`` (2048) entries including one
   special token ``<|endoftext|>`` (id 0, never produced by ``encode``), trained on the
   training split; any text encodes (byte fallback via the 256-symbol byte alphabet).
2. model: ``transformers.LlamaForCausalLM`` from a ``LlamaConfig`` (RMSNorm, RoPE, SwiGLU MLP,
   grouped-query attention, tied input/output embeddings), trained with ``sdpa`` attention.
3. sizing: unless ``--steps`` is given, a few throw-away steps on a copy of the model measure
   the step time (with ``--threads auto``: for 2 and for 1 thread, keeping the faster: on an
   oversubscribed machine 1 thread was 2-3x faster than 2); the run is then sized to ``--fill``
   (0.9) of the budget left after a reserve for the final evaluation. Every 25 steps it
   re-plans its length on the step time of the last ~100 steps (shorter when the machine gets
   busier, longer when it frees up), keeping the LR schedule continuous (``Schedule``). The
   planned step count, the re-plans and the thread count go into training.json, and its
   ``reproduce_command`` (``--steps N --replans S:T,... --threads K``) replays the same run
   (same seed, same threads -> same weights).
4. training: AdamW (betas 0.9/0.95, weight decay on matrices only), linear warmup then cosine
   decay to ``--min-lr-ratio`` x peak, gradient clipping, batches of random 128-token windows
   of the training token stream. If the budget runs out anyway (the hard stop), it stops
   early, says so (``stopped_early``), and still saves.
5. evaluation with ``graphopt.verify.metrics.heldout_perplexity`` (non-overlapping 128-token
   windows) on the whole held-out split and on its first ``--test-windows`` windows (the
   subset ``tests/test_shakespeare_model.py`` re-checks), with the saved weights and ``eager``
   attention, exactly as ``build()`` loads them.

Run from the repo root::

    python samples/shakespeare/train.py                       # ~20 min, writes the checkpoint
    python samples/shakespeare/train.py --budget-min 2 --out build/sh-smoke   # a quick smoke run
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
SPECIAL_TOKEN = "<|endoftext|>"


def _load_factory():
    """``samples/models/shakespeare.py`` by path (the repo root need not be on sys.path)."""
    path = REPO_ROOT / "samples" / "models" / "shakespeare.py"
    spec = importlib.util.spec_from_file_location("_graphopt_sample_models_shakespeare", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE / "checkpoint", help="output directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", default="2", help="torch.set_num_threads: an int, or 'auto' to probe 2 and 1 and keep "
                   "the faster (1 wins on an oversubscribed machine); default: %(default)s")
    p.add_argument("--budget-min", type=float, default=20.0, help="wall-clock budget in minutes, everything included")
    p.add_argument("--steps", type=int, default=None, help="fixed step count (default: sized to the budget)")
    p.add_argument("--fill", type=float, default=0.9, help="fraction of the budget the sized run plans to use")
    p.add_argument("--replans", default="", help="STEP:TOTAL,... schedule re-plans to replay (from training.json)")
    # tokenizer
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--distill-from", type=Path, default=None, metavar="CHECKPOINT",
                   help="train to match this model's next-token distributions (knowledge distillation: KL to its "
                        "softmax, plus --distill-ce x the usual cross-entropy): a draft for speculative decoding "
                        "agrees with its target far more often than one trained on the text alone")
    p.add_argument("--distill-ce", type=float, default=0.1, help="weight of the cross-entropy term when distilling")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="reuse this tokenizer.json instead of training one (a draft model for speculative decoding "
                        "must share the target's tokenizer: --tokenizer samples/shakespeare/checkpoint/tokenizer.json)")
    # model
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--max-positions", type=int, default=256)
    # optimisation
    p.add_argument("--seq-len", type=int, default=128, help="training window length in tokens")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100, help="warmup steps (capped at 10%% of the run)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    # logging / evaluation
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-windows", type=int, default=32, help="held-out windows for the periodic loss")
    p.add_argument("--test-windows", type=int, default=64, help="held-out subset recorded for the test")
    p.add_argument("--calib-steps", type=int, default=4, help="throw-away steps that measure throughput")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_tokenizer(train_text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([train_text], trainer=trainer, length=1)
    return tok


def make_model(args, vocab_size: int, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def make_optimizer(model, args):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


class Schedule:
    """Linear warmup over ``warmup`` steps, then cosine from ``peak`` to ``min_ratio * peak``.

    The cosine phase advances by ``(1 - phase) / (steps left)`` per step: with a fixed
    ``total`` that is exactly the usual ``(step - warmup) / (total - warmup)``. When the
    machine turns out slower (or faster) than probed, ``replan(step, total)`` moves the end:
    the phase goes on from where it is, so the LR stays continuous and still reaches its floor
    at the new end. Every re-plan is recorded (``replans``) and ``--replans`` replays them.
    """

    def __init__(self, total: int, warmup: int, peak: float, min_ratio: float, replans: dict[int, int] | None = None):
        self.total, self.warmup, self.peak, self.min_ratio = total, warmup, peak, min_ratio
        self.phase = 0.0
        self.planned = dict(replans or {})
        self.replans: list[tuple[int, int]] = []

    def replan(self, step: int, total: int) -> None:
        self.total = total
        self.replans.append((step, total))

    def lr(self, step: int) -> float:
        """LR of ``step``; call once per step, in order."""
        if step in self.planned:
            self.replan(step, self.planned[step])
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        lr = self.peak * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * self.phase)))
        self.phase += (1 - self.phase) / max(1, self.total - step)
        return lr


def get_batch(ids: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator):
    starts = torch.randint(0, ids.numel() - seq_len - 1, (batch_size,), generator=gen)
    w = torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])
    return w[:, :-1], w[:, 1:]


def _display_path(path: Path) -> str:
    """A path relative to the repository when it lies inside it (training.json is committed)."""
    try:
        return str(Path(path).resolve().relative_to(HERE.parents[1]))
    except ValueError:
        return str(path)


def train_step(model, opt, x, y, lr: float, grad_clip: float, teacher=None, ce_weight: float = 0.1) -> float:
    for g in opt.param_groups:
        g["lr"] = lr
    logits = model(input_ids=x).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    if teacher is not None:  # distillation: KL(teacher || student) per token, plus a little cross-entropy
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=x).logits.float(), -1).reshape(-1, logits.shape[-1])
        kl = F.kl_div(F.log_softmax(logits, -1).reshape(-1, logits.shape[-1]), target, log_target=True,
                      reduction="batchmean")
        loss = kl + ce_weight * loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.item()


def probe_step_time(model, args, train_ids: torch.Tensor, threads: int, teacher=None) -> float:
    """Median seconds per training step of a throw-away copy of ``model`` (first step excluded)."""
    torch.set_num_threads(threads)
    probe = copy.deepcopy(model).train()
    probe_opt = make_optimizer(probe, args)
    gen = torch.Generator().manual_seed(args.seed + 1000)
    times = []
    for _ in range(max(2, args.calib_steps)):
        x, y = get_batch(train_ids, args.batch_size, args.seq_len, gen)
        ts = time.monotonic()
        train_step(probe, probe_opt, x, y, args.lr * 0.1, args.grad_clip, teacher, args.distill_ce)
        times.append(time.monotonic() - ts)
    return sorted(times[1:])[len(times[1:]) // 2]


def eval_ppl(model, heldout: torch.Tensor, windows: int | None, window: int) -> float:
    from graphopt.verify.metrics import heldout_perplexity

    was_training = model.training
    model.eval()
    try:
        return heldout_perplexity(
            lambda ids: model(input_ids=ids).logits, heldout, window=window, batch_size=8, max_windows=windows
        )
    finally:
        model.train(was_training)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    budget_s = args.budget_min * 60.0
    thread_choices = [2, 1] if args.threads == "auto" else [int(args.threads)]
    torch.set_num_threads(thread_choices[0])
    factory = _load_factory()

    # -- data + tokenizer -----------------------------------------------------------------------
    text = factory.read_text()
    train_text, heldout_text = factory.split_text(text)
    log(f"data: {len(text):,} chars -> train {len(train_text):,} (text[:{len(train_text)}]), held-out {len(heldout_text):,}")
    if args.tokenizer is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(args.tokenizer))
    else:
        tok = train_tokenizer(train_text, args.vocab_size)
    train_ids = torch.tensor(tok.encode(train_text).ids, dtype=torch.int64)
    heldout_ids = torch.tensor(tok.encode(heldout_text).ids, dtype=torch.int64)
    assert tok.decode(heldout_ids.tolist()) == heldout_text, "byte-level BPE must round-trip the text"
    log(
        f"tokenizer: vocab {tok.get_vocab_size()}, train {train_ids.numel():,} tokens "
        f"({len(train_text) / train_ids.numel():.2f} chars/token), held-out {heldout_ids.numel():,} tokens"
    )

    # -- model ----------------------------------------------------------------------------------
    model = make_model(args, tok.get_vocab_size(), tok.token_to_id(SPECIAL_TOKEN))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters; {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
        f"{model.config.num_attention_heads} heads / {model.config.num_key_value_heads} KV heads, "
        f"intermediate {model.config.intermediate_size}")
    tokens_per_step = args.batch_size * args.seq_len
    teacher = None
    if args.distill_from is not None:
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(str(args.distill_from), local_files_only=True).eval()
        teacher.requires_grad_(False)
        if teacher.config.vocab_size != tok.get_vocab_size():
            raise SystemExit(f"--distill-from {args.distill_from}: vocabulary {teacher.config.vocab_size} != the "
                             f"tokenizer's {tok.get_vocab_size()}; pass --tokenizer {args.distill_from}/tokenizer.json")
        log(f"distilling from {args.distill_from} ({sum(p.numel() for p in teacher.parameters()):,} parameters; "
            f"loss = KL(teacher || model) + {args.distill_ce} x cross-entropy)")

    # -- size the run to the budget -------------------------------------------------------------
    # reserve: the final whole-split evaluation (forward only, ~1/3 of a training step per token)
    # and saving; estimated from the measured step time.
    if args.steps is None or len(thread_choices) > 1:
        probed = {n: probe_step_time(model, args, train_ids, n, teacher) for n in thread_choices}
        threads = min(probed, key=probed.get)
        step_s = probed[threads]
        if len(probed) > 1:
            log("threads: " + ", ".join(f"{n} -> {t:.3f} s/step" for n, t in probed.items()) + f"; using {threads}")
    else:
        threads = thread_choices[0]
    torch.set_num_threads(threads)
    if args.steps is None:
        eval_tokens = heldout_ids.numel() + args.test_windows * args.seq_len
        reserve_s = 30.0 + eval_tokens / (tokens_per_step / step_s) / 2.0
        periodic_eval_frac = 1 + (args.eval_windows * args.seq_len / 2.0) / (args.eval_every * tokens_per_step)
        usable = (budget_s - (time.monotonic() - t0) - reserve_s) * args.fill
        steps = max(10, int(usable / (step_s * periodic_eval_frac)))
        log(f"throughput probe: {step_s:.3f} s/step = {tokens_per_step / step_s:,.0f} tokens/s "
            f"-> planning {steps} steps ({steps * tokens_per_step:,} tokens, "
            f"{steps * tokens_per_step / train_ids.numel():.2f} epochs); reserve {reserve_s:.0f} s")
    else:
        steps = args.steps
        log(f"fixed run: {steps} steps ({steps * tokens_per_step:,} tokens)")
    warmup = max(1, min(args.warmup, steps // 10))
    replay = dict(tuple(int(v) for v in item.split(":")) for item in args.replans.split(",") if item)
    adaptive = args.steps is None  # sized to the budget: re-plans itself as the machine slows down / speeds up
    steps_planned = steps
    schedule = Schedule(steps, warmup, args.lr, args.min_lr_ratio, replay)

    # -- train ----------------------------------------------------------------------------------
    model.train()
    opt = make_optimizer(model, args)
    gen = torch.Generator().manual_seed(args.seed)
    history, recent = [], []
    stopped_early = False
    train_start = time.monotonic()
    last_t, last_step = train_start, 0
    marks = [(train_start, 0)]  # (time, steps done) at every log point, for re-planning
    step = 0
    deadline = t0 + budget_s - (reserve_s if args.steps is None else 30.0 + heldout_ids.numel() / 2000)
    while step < schedule.total:
        if time.monotonic() > deadline:
            stopped_early = True
            log(f"wall-clock budget reached: stopping after {step} of {schedule.total} steps")
            break
        x, y = get_batch(train_ids, args.batch_size, args.seq_len, gen)
        lr = schedule.lr(step)
        recent.append(train_step(model, opt, x, y, lr, args.grad_clip, teacher, args.distill_ce))
        step = done = step + 1
        if adaptive and done % args.log_every == 0 and done > warmup:
            # re-plan on the step time of the last ~100 steps (periodic evaluations included)
            now = time.monotonic()
            marks.append((now, done))
            t_then, s_then = marks[max(0, len(marks) - 5)]
            step_s = (now - t_then) / (done - s_then)
            fits = done + int((deadline - now) * 0.95 / step_s)  # the run length that ends in time
            # shrink as soon as it would overrun; grow only by > 3 % (no flapping on noise)
            if fits < schedule.total - 2 or fits > 1.03 * schedule.total + 2:
                log(f"re-plan: {step_s:.2f} s/step lately -> {max(done + 1, fits)} steps (was {schedule.total})")
                schedule.replan(done, max(done + 1, fits))
        steps = schedule.total
        if done % args.log_every == 0 or done == steps:
            now = time.monotonic()
            tps = (done - last_step) * tokens_per_step / (now - last_t)
            entry = {"step": done, "train_loss": sum(recent) / len(recent), "lr": lr, "tokens_per_s": tps,
                     "elapsed_s": now - t0}
            if done % args.eval_every == 0 or done == steps:
                entry["heldout_loss"] = math.log(eval_ppl(model, heldout_ids, args.eval_windows, args.seq_len))
            history.append(entry)
            log(f"step {done}/{steps}  loss {entry['train_loss']:.4f}  lr {lr:.2e}  {tps:,.0f} tok/s  "
                f"{entry['elapsed_s']:.0f} s" + (f"  held-out loss {entry['heldout_loss']:.4f} "
                f"(first {args.eval_windows} windows)" if "heldout_loss" in entry else ""))
            recent = []
            last_t, last_step = time.monotonic(), done
    steps_done = step
    train_wall = time.monotonic() - train_start
    final_train_loss = history[-1]["train_loss"] if history else float("nan")
    if recent:  # a partial logging interval (early stop)
        final_train_loss = sum(recent) / len(recent)

    # -- save (atomically: temp dir, then rename) -------------------------------------------------
    out = args.out.resolve()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "generation_config.json").unlink(missing_ok=True)  # defaults only; config.json suffices
    tok.save(str(tmp / "tokenizer.json"))

    # -- evaluate the SAVED weights, loaded the way build() loads them ----------------------------
    loaded, _, _ = factory.build(checkpoint_dir=tmp, attn_implementation="eager")
    ts = time.monotonic()
    ppl_subset = eval_ppl(loaded, heldout_ids, args.test_windows, args.seq_len)
    ppl_whole = eval_ppl(loaded, heldout_ids, None, args.seq_len)
    eval_s = time.monotonic() - ts
    n_windows = (heldout_ids.numel() - 1 - args.seq_len) // args.seq_len + 1
    scored = n_windows * args.seq_len
    bits_per_char = math.log(ppl_whole) * scored / len(tok.decode(heldout_ids[1 : scored + 1].tolist())) / math.log(2)
    log(f"held-out perplexity: whole split {ppl_whole:.3f} ({n_windows} windows, {bits_per_char:.3f} bits/char), "
        f"first {args.test_windows} windows {ppl_subset:.3f}  [{eval_s:.0f} s]")

    cmd = ["python", os.path.relpath(Path(sys.argv[0]).resolve(), Path.cwd())] + (sys.argv[1:] if argv is None else list(argv))
    repro = [a for a in cmd]
    replans = ",".join(f"{s}:{t}" for s, t in schedule.replans)
    for flag, value in (("--steps", steps_planned), ("--threads", threads), ("--replans", replans)):
        if not value:
            continue
        if flag in repro:
            repro[repro.index(flag) + 1] = str(value)
        else:
            repro += [flag, str(value)]
    record = {
        "seed": args.seed,
        "steps": steps_done,
        "steps_planned": steps_planned,
        "stopped_early": stopped_early,
        "warmup_steps": warmup,
        "replans": ",".join(f"{s}:{t}" for s, t in schedule.replans),
        "tokens_per_step": tokens_per_step,
        "tokens_seen": steps_done * tokens_per_step,
        "epochs": steps_done * tokens_per_step / train_ids.numel(),
        "train_tokens_per_s": steps_done * tokens_per_step / train_wall if train_wall > 0 else None,
        "train_wall_time_s": round(train_wall, 1),
        "wall_time_s": round(time.monotonic() - t0, 1),
        "final_train_loss": final_train_loss,
        "heldout": {
            "split": "text[int(0.9 * len(text)):] (last 10% of the characters)",
            "chars": len(heldout_text),
            "tokens": heldout_ids.numel(),
            "metric": "graphopt.verify.metrics.heldout_perplexity, non-overlapping windows, eager attention, float32",
            "window": args.seq_len,
            "whole": {"windows": n_windows, "perplexity": ppl_whole, "loss": math.log(ppl_whole),
                      "bits_per_char": bits_per_char},
            "test_subset": {"windows": args.test_windows, "batch_size": 8, "perplexity": ppl_subset},
        },
        "parameters": n_params,
        "distilled_from": (None if args.distill_from is None else {
            "checkpoint": _display_path(args.distill_from), "loss": f"KL(teacher || model) + {args.distill_ce} x CE"}),
        "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                  "intermediate": args.intermediate, "max_positions": args.max_positions,
                  "vocab_size": tok.get_vocab_size()},
        "tokenizer": {"type": "byte-level BPE (tokenizers)", "vocab_size": tok.get_vocab_size(),
                      "trained_on": "training split only", "train_tokens": train_ids.numel(),
                      "chars_per_token": len(train_text) / train_ids.numel()},
        "optimizer": {"name": "AdamW", "lr": args.lr, "betas": [0.9, 0.95], "weight_decay": args.weight_decay,
                      "schedule": f"linear warmup {warmup} steps, cosine to {args.min_lr_ratio} x lr at the last step",
                      "grad_clip": args.grad_clip, "batch_size": args.batch_size, "seq_len": args.seq_len},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__,
                    "tokenizers": __import__("tokenizers").__version__},
        "command": shlex.join(cmd),
        "reproduce_command": shlex.join(repro),
        "history": history,
    }
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    size = sum(f.stat().st_size for f in out.iterdir())
    log(f"saved {out} ({size / 1e6:.2f} MB) in {time.monotonic() - t0:.0f} s total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
