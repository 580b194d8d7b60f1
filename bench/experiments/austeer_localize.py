"""AUSteer localization cost: streaming momentum statistics over 1,000 contrastive pairs vs the forward passes
alone (the builder's overhead on top of the model).

Pairs: the first ``--pairs`` strategyqa records (question + right answer vs + the opposite answer), tokenized
as the evaluation harness does. The pairs are cut into batches of ``--batch-size`` pairs (2x rows, one
right-padded forward per batch). For every batch, in a shuffled order, each arm runs once:

* ``forward``      — tokenize, pad, ``model(..., use_cache=False, logits_to_keep=1)``; no hooks;
* ``localize:<s>`` — the builder's own path for site s: :func:`fusesteer.methods.austeer.pair_activations`
  (same tokenization and forward, with the site recorders on every layer, last-token gather, copy to fp32)
  feeding :class:`~fusesteer.methods.austeer.MomentumStats` (counts of m > 0, m < 0, running sum of m);
* ``localize:all`` — the three sites recorded in one pass (what ``localize_many`` does).

Interleaving per batch makes the comparison robust to the load drifting on a shared machine. Reported:
total seconds per arm, overhead = total(arm) / total(forward) - 1, the median of per-batch ratios with a
bootstrap 95% CI, the ranking + plan-building time for k = 100, and the memory of the streaming state vs
what holding every activation would take. Writes bench/results/austeer_localize.{json,md}.

    python bench/experiments/austeer_localize.py [--pairs 1000] [--batch-size 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the checkout: bench/experiments/<this file>
sys.path.insert(0, str(ROOT))

from fusesteer import models  # noqa: E402
from fusesteer.evaluate import stats, tasks  # noqa: E402
from fusesteer.methods import austeer as A  # noqa: E402
from fusesteer.methods.pairs import make_pairs, pair_token_ids, right_padded  # noqa: E402

OUT = ROOT / "bench" / "results"
SITES = ("head", "ffn", "down")


def forward_only(model, tok, chunk, pad: int) -> None:
    ids_pairs = [pair_token_ids(tok, p) for p in chunk]
    seqs = [a for a, _ in ids_pairs] + [b for _, b in ids_pairs]
    ids, mask = right_padded(seqs, pad)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per forward (2x rows)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from fusesteer.bench.common import machine_info

    model, tok = models.load(args.model, progress=False)
    records = tasks.load_dataset("strategyqa", limit=args.pairs)
    pairs = make_pairs(records)
    if len(pairs) < args.pairs:
        print(f"only {len(pairs)} pairs available", file=sys.stderr)
    pad = A.pad_id(tok)
    chunks = [pairs[i:i + args.batch_size] for i in range(0, len(pairs), args.batch_size)]
    arms = ["forward"] + [f"localize:{s}" for s in SITES] + ["localize:all"]
    st = {s: A.MomentumStats() for s in SITES}
    st_all = {A.resolve_site(s): A.MomentumStats() for s in SITES}
    times = {a: [] for a in arms}
    rng = random.Random(args.seed)

    def run(arm, chunk):
        if arm == "forward":
            forward_only(model, tok, chunk, pad)
        elif arm == "localize:all":
            for item in A.pair_activations(model, tok, chunk, list(SITES), batch_size=len(chunk)):
                for s, (p, n) in item.items():
                    st_all[s].update(p, n)
        else:
            s = arm.split(":", 1)[1]
            for p, n in A.pair_activations(model, tok, chunk, s, batch_size=len(chunk)):
                st[s].update(p, n)

    run("forward", chunks[0])  # warm-up (not counted)
    t_wall = time.perf_counter()
    gc.disable()
    try:
        for i, chunk in enumerate(chunks):
            order = arms[:]
            rng.shuffle(order)
            for arm in order:
                t = time.perf_counter()
                run(arm, chunk)
                times[arm].append(time.perf_counter() - t)
            if i % 10 == 9:
                gc.collect()
                print(f"[{time.strftime('%H:%M:%S')}] {i + 1}/{len(chunks)} batches", file=sys.stderr, flush=True)
    finally:
        gc.enable()
    wall = time.perf_counter() - t_wall

    # ranking + plan build (k = 100) on the finished statistics
    build = {}
    spec = A.ModelSpec.from_model(model)
    for s in SITES:
        loc = A.Localization(st[s], A.resolve_site(s), spec, {"dataset": "strategyqa"})
        t = time.perf_counter()
        A.austeer_plan(loc, 100, 10.0)
        build[s] = time.perf_counter() - t
        assert torch.equal(st[s].pos_count, st_all[A.resolve_site(s)].pos_count)

    fwd = times["forward"]
    res = {"model": args.model, "n_pairs": len(pairs), "batch_size_pairs": args.batch_size, "n_batches": len(chunks),
           "sequences_per_arm": 2 * len(pairs), "machine": machine_info(torch.device("cpu")),
           "wall_seconds_all_arms": wall, "arms": {}}
    for a in arms:
        ratios = [t / f for t, f in zip(times[a], fwd)]
        entry = {"total_s": sum(times[a]), "per_batch_median_ms": 1000 * sorted(times[a])[len(times[a]) // 2]}
        if a != "forward":
            ci = stats.bootstrap_ci(ratios, "median", n_boot=4000, seed=args.seed)
            s_key = a.split(":", 1)[1]
            if s_key in SITES:
                L, W = st[s_key].shape
            else:
                L, W = 0, 0
                for s in SITES:
                    L, W = st[s].shape[0], W + st[s].shape[1]
            state = 3 * 8 * L * W  # pos_count, neg_count (int64), sum_m (float64)
            entry.update(overhead_total=sum(times[a]) / sum(fwd) - 1, ratio_median=ci.estimate,
                         ratio_ci_low=ci.low, ratio_ci_high=ci.high, aus=L * W, streaming_state_bytes=state,
                         materialized_bytes=2 * len(pairs) * L * W * 4)
            if s_key in SITES:
                entry["rank_and_plan_k100_ms"] = 1000 * build[s_key]
        res["arms"][a] = entry
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "austeer_localize.json").write_text(json.dumps(res, indent=2))
    md = [f"# AUSteer localization cost ({args.model}, {len(pairs)} strategyqa pairs)", "",
          f"{len(chunks)} batches of {args.batch_size} pairs ({2 * args.batch_size} right-padded rows, "
          f"{2 * len(pairs)} sequences per arm); arms interleaved per batch in shuffled order; torch threads "
          f"{torch.get_num_threads()}; load average at start {res['machine']['load_average_1_5_15']} "
          f"(shared 2-core VM).", "",
          "| arm | total (s) | overhead vs forward (totals) | median per-batch ratio [95% CI] | AUs | "
          "streaming state | all activations | rank + plan k=100 |",
          "|---|---:|---:|---|---:|---:|---:|---:|"]
    for a in arms:
        e = res["arms"][a]
        if a == "forward":
            md.append(f"| forward only | {e['total_s']:.1f} | — | — | — | — | — | — |")
            continue
        rp = f"{e['rank_and_plan_k100_ms']:.1f} ms" if "rank_and_plan_k100_ms" in e else "—"
        md.append(f"| {a} | {e['total_s']:.1f} | {100 * e['overhead_total']:+.1f}% | {e['ratio_median']:.3f} "
                  f"[{e['ratio_ci_low']:.3f}, {e['ratio_ci_high']:.3f}] | {e['aus']} | "
                  f"{e['streaming_state_bytes'] / 2**20:.1f} MiB | {e['materialized_bytes'] / 2**20:.0f} MiB | {rp} |")
    md += ["", "`localize:<site>` = the builder's capture (hooks on every layer, last-token gather, fp32 copy) plus "
           "the streaming statistics; `localize:all` records head, ffn and down in one pass. 'all activations' is "
           "what storing every last-token activation of both members of every pair would take."]
    (out / "austeer_localize.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
