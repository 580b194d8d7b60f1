"""Fold backend on SmolLM2-135M: memory kept for the restore, and decode-step time folded vs vanilla.

A k = 100 gains plan (AUSteer-style: 100 random units drawn over every layer's ``attn.o_proj.in`` and
``mlp.down_proj.in`` dims, gain a = 1 + gamma) is attached with ``backend="fold"``.

* Memory: bytes the fold keeps to restore the weights (touched columns + their indices), checked against
  the expected k columns of ``out_features`` each, compared with the model's size; RSS before/after attach.
* Speed: :func:`fusesteer.timing.paired_decode_steps` -- one cached decode step per arm per cycle, arms
  interleaved in shuffled order (vanilla, fold, and the same plan on the fused ``torch`` backend for
  context), batch 1, cache = prompt + 32 generated tokens (the middle of a 64-new-token decode). The fold
  arm is attached and detached around every timed step (outside the timing), which also exercises the
  bit-exact restore hundreds of times: the state_dict is compared bit for bit at the end.
* Correctness on the real model: 64 new greedy tokens with fold == with the reference hooks.

Single-threaded (torch.set_num_threads(1)); writes bench/results/fold.json.

    python bench/experiments/fold_memory.py [--cycles 300] [--k 100]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the checkout: bench/experiments/<this file>
sys.path.insert(0, str(ROOT))

import fusesteer as fs  # noqa: E402
from fusesteer.timing import paired_decode_steps  # noqa: E402


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return -1


def k_gains_plan(model, k: int, seed: int = 0) -> fs.SteeringPlan:
    spec = fs.ModelSpec.from_model(model)
    units = [(layer, site, w) for layer in range(spec.num_layers)
             for site, w in (("attn.o_proj.in", spec.attn_width), ("mlp.down_proj.in", spec.intermediate_size))]
    offsets, total = [], 0
    for u in units:
        offsets.append(total)
        total += u[2]
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(total, generator=g)[:k].tolist()
    groups: dict = {}
    for p in picks:
        i = max(j for j, o in enumerate(offsets) if o <= p)
        layer, site, _ = units[i]
        groups.setdefault((layer, site), []).append(p - offsets[i])
    plan = fs.SteeringPlan.for_model(model, name=f"random-k{k}-gains")
    for (layer, site), dims in sorted(groups.items()):
        gamma = (torch.rand(len(dims), generator=g) - 0.5)  # a = 1 + gamma, gamma in [-0.5, 0.5)
        plan.add(layer=layer, site=site, a=1 + gamma, dims=torch.tensor(sorted(dims)))
    return plan


def expected_slice_bytes(model, plan) -> int:
    total = 0
    for e in plan.entries:
        lay = model.model.layers[e.layer]
        lin = lay.self_attn.o_proj if e.site == "attn.o_proj.in" else lay.mlp.down_proj
        total += e.dims.numel() * lin.out_features * lin.weight.element_size()
    return total


def bits(sd):
    return {k: v.detach().reshape(-1).contiguous().view(torch.uint8).clone() for k, v in sd.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--cycles", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fold.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)

    model, tok = fs.models.load(args.model)
    plan = k_gains_plan(model, args.k)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    before = bits(model.state_dict())
    names_before = [n for n, _ in model.named_parameters()]

    # ---- memory ----------------------------------------------------------------------------------
    gc.collect()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    h = fs.attach(model, plan, backend="fold")
    attach_ms = (time.perf_counter() - t0) * 1e3
    gc.collect()
    rss1 = rss_bytes()
    rep = dict(h.report)
    t0 = time.perf_counter()
    h.detach()
    detach_ms = (time.perf_counter() - t0) * 1e3
    expect = expected_slice_bytes(model, plan)
    assert rep["restore_slice_bytes"] == expect, (rep["restore_slice_bytes"], expect)
    memory = {
        "k": args.k,
        "entries": len(plan.entries),
        "modules_touched": len(rep["modules"]),
        "model_bytes": model_bytes,
        "restore_bytes": rep["restore_bytes"],
        "restore_slice_bytes": rep["restore_slice_bytes"],
        "restore_index_bytes": rep["restore_index_bytes"],
        "restore_bias_bytes": rep["restore_bias_bytes"],
        "expected_slice_bytes(k*out_features*elem)": expect,
        "restore_fraction_of_model": rep["restore_bytes"] / model_bytes,
        "rss_delta_bytes": rss1 - rss0,
        "attach_ms": attach_ms,
        "detach_ms": detach_ms,
    }

    # ---- correctness on the real model -------------------------------------------------------------
    msgs = [{"role": "user", "content": "Name three primary colors and explain why they are called primary."}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = prompt["input_ids"]
    gen_kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        outs = {}
        for backend in ("reference", "fold"):
            with fs.attach(model, plan, backend=backend, check_finite=False):
                outs[backend] = model.generate(ids, **gen_kw)[0, ids.shape[1]:]
        vanilla_tokens = model.generate(ids, **gen_kw)[0, ids.shape[1]:]
    same_tokens = bool(torch.equal(outs["reference"], outs["fold"]))
    differs_from_vanilla = int((outs["fold"] != vanilla_tokens).sum())

    # ---- decode-step timing ------------------------------------------------------------------------
    ctx = torch.cat([ids, vanilla_tokens[: args.new_tokens // 2][None]], dim=1)
    arms = {
        "vanilla": None,
        "fold": lambda: fs.attach(model, plan, backend="fold"),
        "torch": lambda: fs.attach(model, plan, backend="torch"),
    }
    t0 = time.perf_counter()
    res = paired_decode_steps(model, ctx, arms, cycles=args.cycles, warmup=args.warmup)
    timing_s = time.perf_counter() - t0
    timing = {n: r.summary() for n, r in res.items()}

    after = bits(model.state_dict())
    restored = set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    restored = restored and [n for n, _ in model.named_parameters()] == names_before

    out = {
        "model": args.model,
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "plan": {"name": plan.name, "k": args.k, "sites": ["attn.o_proj.in", "mlp.down_proj.in"],
                 "entries": len(plan.entries)},
        "memory": memory,
        "greedy_64_tokens_fold_equals_reference": same_tokens,
        "greedy_tokens_changed_vs_vanilla": differs_from_vanilla,
        "timing": {"method": "paired_decode_steps (interleaved, shuffled per cycle; median of paired ratios, "
                             "bootstrap 95% CI)", "batch": 1, "cache_len": int(ctx.shape[1]),
                   "cycles": args.cycles, "warmup": args.warmup, "wall_s": timing_s, "arms": timing},
        "state_dict_bit_identical_after_all_cycles": restored,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))

    mb = 1024 * 1024
    print(f"\nfold on {args.model} (fp32, 1 thread), k = {args.k} random gains over "
          f"attn.o_proj.in + mlp.down_proj.in ({len(plan.entries)} entries, {len(rep['modules'])} weights)")
    print(f"{'model size':<34}{model_bytes / mb:>12.2f} MiB")
    print(f"{'kept for restore (total)':<34}{rep['restore_bytes'] / 1024:>12.1f} KiB"
          f"  ({100 * rep['restore_bytes'] / model_bytes:.4f}% of the model)")
    print(f"{'  weight columns':<34}{rep['restore_slice_bytes'] / 1024:>12.1f} KiB  (expected k*out*4 = "
          f"{expect / 1024:.1f} KiB)")
    print(f"{'  indices':<34}{rep['restore_index_bytes'] / 1024:>12.1f} KiB")
    print(f"{'RSS delta at attach':<34}{(rss1 - rss0) / 1024:>12.1f} KiB  (allocator noise at this scale)")
    print(f"{'attach / detach':<34}{attach_ms:>9.1f} ms / {detach_ms:.1f} ms")
    print(f"{'64 greedy tokens fold == reference':<34}{str(same_tokens):>12}  "
          f"({differs_from_vanilla} of {args.new_tokens} differ from vanilla)")
    print(f"\ndecode step, batch 1, cache {ctx.shape[1]} tokens, {args.cycles} interleaved cycles:")
    print(f"{'arm':<10}{'median ms':>10}{'ratio':>9}{'95% CI':>20}")
    for n, s in timing.items():
        if "ratio_median" in s:
            print(f"{n:<10}{s['median_ms']:>10.2f}{s['ratio_median']:>9.3f}"
                  f"{'[' + format(s['ratio_ci_low'], '.3f') + ', ' + format(s['ratio_ci_high'], '.3f') + ']':>20}")
        else:
            print(f"{n:<10}{s['median_ms']:>10.2f}{'1.000':>9}{'(baseline)':>20}")
    print(f"\nstate_dict bit-identical after {args.cycles + args.warmup} fold attach/detach cycles: {restored}")
    print(f"wrote {args.out}")
    if not (restored and same_tokens):
        sys.exit(1)


if __name__ == "__main__":
    main()
