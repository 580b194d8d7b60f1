"""AUSteer vs baselines on SmolLM2-135M-Instruct: hyperparameters picked on a validation slice, accuracy on a
disjoint test slice, for strategyqa (yes/no) and truthfulqa_mc (multiple choice).

Per dataset the records are split with ``fusesteer.evaluate.tasks.split(records, n_val, n_test, seed)``;
contrastive pairs come only from the records left over (disjoint from validation and test). Methods, all as
plans in the same runtime (backend ``torch``) and scored by the same harness:

* vanilla;
* AUSteer-Head (``attn.o_proj.in``) and AUSteer-FFN (``mlp.out``): (k, α) swept on validation;
* CAA: mean ``layer.out`` difference added at one layer; (layer, multiplier) swept on validation;
* ITI-style head shifts: top-K heads by paired separation, shift α·σ·θ̂; (K, α) swept;
* ablations of AUSteer-FFN (paper Table 3): random localization, activation-difference localization,
  fixed vector, fixed strength; each at the k chosen for AUSteer-FFN, with α swept on validation over the
  same α grid (their strengths live on different scales, e.g. the fixed vector's b = α·mean m).

One streaming pass over the pairs records the head, FFN and ``layer.out`` sites together (CAA's vector is
the mean ``layer.out`` momentum, the same quantity as ``baselines.caa_vectors``) plus ITI's head statistics.

For each method the best validation cell (ties: fewer units, then smaller strength) is evaluated once on the
test slice; reported with a Wilson 95% interval, the paired bootstrap CI of (method − vanilla) and an exact
McNemar p-value on the same test items. Yes/no items are scored by the " Yes"/" No" next-token logits
(identical to the summed log-prob of the one-token choices, at half the forwards); multiple choice by the
summed log-probability of each choice.

Writes bench/results/austeer_results.{json,md,png} and one validation heatmap per swept method
(bench/results/austeer_sweep_<dataset>_<method>.png).

    python bench/experiments/austeer_results.py [--datasets strategyqa truthfulqa_mc] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the checkout: bench/experiments/<this file>
sys.path.insert(0, str(ROOT))

from fusesteer import attach, models  # noqa: E402
from fusesteer.evaluate import stats, tasks  # noqa: E402
from fusesteer.methods import austeer as A  # noqa: E402
from fusesteer.methods import baselines as B  # noqa: E402
from fusesteer.methods import sweep as SW  # noqa: E402
from fusesteer.methods.pairs import make_pairs  # noqa: E402

OUT = ROOT / "bench" / "results"

CONFIGS = {
    "strategyqa": dict(n_val=60, n_test=200, n_pairs=300, negatives="random", eval_method="logits"),
    "truthfulqa_mc": dict(n_val=30, n_test=70, n_pairs=None, negatives="all", eval_method="logprob"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--datasets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--k", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    ap.add_argument("--alpha", type=float, nargs="+", default=[1, 5, 10, 20, 50, 100])
    ap.add_argument("--ablation-k", type=int, nargs="+", default=None,
                    help="k values for the ablations (default: the k chosen for AUSteer-FFN)")
    ap.add_argument("--ablation-alpha", type=float, nargs="+", default=None, help="default: --alpha")
    ap.add_argument("--caa-layers", type=int, nargs="+", default=[4, 9, 14, 19, 24])
    ap.add_argument("--caa-scales", type=float, nargs="+", default=[1, 4, 8])
    ap.add_argument("--iti-heads", type=int, nargs="+", default=[4, 16, 48])
    ap.add_argument("--iti-alpha", type=float, nargs="+", default=[1, 5, 15])
    ap.add_argument("--skip", nargs="*", default=[], help="methods to skip (e.g. iti fixed_vector)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--render-only", action="store_true",
                    help="only merge the per-dataset JSON files in --out into austeer_results.{json,md,png}")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    if args.render_only:
        render(out)
        return 0
    model, tok = models.load(args.model, progress=False)
    n_heads = model.config.num_attention_heads
    from fusesteer.bench.common import machine_info

    for ds in args.datasets:
        report = {"model": args.model, "machine": machine_info(torch.device("cpu")), "args": vars(args),
                  "datasets": {}}
        json_path = out / f"austeer_results_{ds}.json"
        t_ds = time.perf_counter()
        cfg = CONFIGS[ds]
        records = tasks.load_dataset(ds)
        kind = tasks.task_kind(records)
        val, test = tasks.split(records, cfg["n_val"], cfg["n_test"], seed=args.seed)
        used = {r["id"] for r in val + test}
        rest = [r for r in records if r["id"] not in used]
        pairs = make_pairs(rest, negatives=cfg["negatives"], seed=args.seed, limit=cfg["n_pairs"])
        prov = A.provenance(ds, pairs, args.seed, negatives=cfg["negatives"], split_seed=args.seed,
                            disjoint_from="validation and test slices")
        log(f"{ds}: {len(val)} val, {len(test)} test, {len(pairs)} pairs from "
            f"{len({p.id.split('#')[0] for p in pairs})}"
            f" other records")
        em, bs = cfg["eval_method"], args.batch_size

        def ev(recs, plan=None):
            if plan is None:
                return tasks.evaluate(model, tok, recs, kind, batch_size=bs, method=em, progress=False)
            with attach(model, plan, backend="torch", check_finite=False):
                return tasks.evaluate(model, tok, recs, kind, batch_size=bs, method=em, progress=False)

        dsrep = {"config": cfg, "kind": kind, "n_val": len(val), "n_test": len(test), "pairs": prov,
                 "localization_seconds": {}, "sweeps": {}, "test": {}}
        report["datasets"][ds] = dsrep

        t0 = time.perf_counter()
        van_test = ev(test)
        log(f"{ds}: vanilla test {van_test.accuracy:.3f} ({time.perf_counter() - t0:.0f}s)")
        van_c = van_test.correct_vector

        def record_test(name, res, chosen, n_units):
            d = stats.paired_bootstrap_diff(res.correct_vector, van_c, n_boot=5000, seed=args.seed)
            p = stats.mcnemar_p(res.correct_vector, van_c)
            dsrep["test"][name] = {"accuracy": res.accuracy, "correct": res.correct, "n": res.n,
                                   "ci_low": res.ci_low, "ci_high": res.ci_high, "chosen": chosen,
                                   "steered_activations": n_units, "diff_vs_vanilla": d.estimate,
                                   "diff_ci_low": d.low, "diff_ci_high": d.high, "mcnemar_p": p}
            log(f"{ds}: {name} test {res.accuracy:.3f} (chosen {chosen}; diff {d.estimate:+.3f} "
                f"[{d.low:+.3f}, {d.high:+.3f}], McNemar p={p:.3f})")
            json_path.write_text(json.dumps(report, indent=2))

        record_test("vanilla", van_test, None, 0)

        van_val = tasks.evaluate(model, tok, val, kind, batch_size=bs, method=em, progress=False)
        dsrep["vanilla_val_accuracy"] = van_val.accuracy
        log(f"{ds}: vanilla val {van_val.accuracy:.3f}")

        def run_sweep(name, rows, cols, fn, row_name, col_name, units_of):
            t = time.perf_counter()
            res = SW.sweep(model, tok, val, rows, cols, fn, method=f"{name} ({ds})", row_name=row_name,
                          col_name=col_name, backend="torch", batch_size=bs, eval_method=em, vanilla=van_val)
            res.info = {"seconds": res.seconds}
            dsrep["sweeps"][name] = res.to_dict()
            res.heatmap(out / f"austeer_sweep_{ds}_{name}.png", title=f"{name} on {ds} (validation)")
            best = res.best
            log(f"{ds}: {name} sweep {time.perf_counter() - t:.0f}s, best {best}")
            plan = fn(best[row_name], best[col_name])
            record_test(name, ev(test, plan), {row_name: best[row_name], col_name: best[col_name],
                                               "val_accuracy": best["accuracy"]}, units_of(plan))
            return best

        def n_units(plan):
            return int(sum(e.dims.numel() if e.dims is not None else plan.spec.site_width(e.site)
                           for e in plan.entries))

        ks, alphas = args.k, args.alpha
        # one pass over the pairs records head, ffn (AUSteer) and layer.out (CAA) plus ITI's head statistics
        locs = A.localize_many(model, tok, pairs, ["head", "ffn", "layer.out"], batch_size=8, provenance=prov,
                               extra={"head": {"iti": B.HeadStats(n_heads)}})
        locs = {"head": locs["attn.o_proj.in"], "ffn": locs["mlp.out"], "layer.out": locs["layer.out"]}
        dsrep["localization_seconds"]["head+ffn+layer.out (one pass)"] = locs["head"].seconds
        log(f"{ds}: localized head, ffn, layer.out over {len(pairs)} pairs in {locs['head'].seconds:.0f}s")
        for site in ("head", "ffn"):
            dsrep.setdefault("top_units", {})[site] = A.austeer_plan(locs[site], 10, 1.0).metadata["units"]
            L, W = locs[site].stats.shape
            dsrep.setdefault("n_aus", {})[site] = L * W
            log(f"{ds}: {site} top score {float(locs[site].stats.scores.max()):.3f}")
        best_k = {}
        for site in ("head", "ffn"):
            name = f"austeer_{site}"
            if name in args.skip:
                continue
            loc = locs[site]
            best_k[site] = run_sweep(name, ks, alphas, lambda k, a, loc=loc: A.austeer_plan(loc, k, a), "k",
                                     "alpha", n_units)["k"]

        spec = locs["ffn"].spec
        if "caa" not in args.skip:
            # mean layer.out difference at the last token = B.caa_vectors (caa.mean_difference), from the shared pass
            vecs = locs["layer.out"].stats.mean_m.float()
            run_sweep("caa", args.caa_layers, args.caa_scales,
                      lambda l, s: B.caa_layer_plan(spec, l, vecs[l], s, prov), "layer", "scale", n_units)
        if "iti" not in args.skip:
            hs = locs["head"].extra["iti"]
            run_sweep("iti", args.iti_heads, args.iti_alpha, lambda K, a: B.iti_plan(hs, spec, K, a, prov),
                      "heads", "alpha", n_units)
        floc = locs["ffn"]
        # ablations of AUSteer-FFN: the k chosen for AUSteer-FFN (or --ablation-k), alpha swept on validation
        aks = args.ablation_k or [best_k.get("ffn", ks[0])]
        aalphas = args.ablation_alpha or alphas
        for name in ("random", "actdiff", "fixed_vector", "fixed_strength"):
            if name in args.skip:
                continue
            fn = B.ABLATIONS[name]
            run_sweep(name, aks, aalphas, lambda k, a, fn=fn: fn(floc, k, a), "k", "alpha", n_units)

        report["wall_seconds"] = time.perf_counter() - t_ds
        json_path.write_text(json.dumps(report, indent=2))
        log(f"{ds} done in {report['wall_seconds'] / 60:.1f} min -> {json_path}")
    render(out)
    log(f"all done in {(time.perf_counter() - t_start) / 60:.1f} min")
    return 0


def render(out: Path) -> None:
    """Merge every austeer_results_<dataset>.json in ``out`` into austeer_results.{json,md,png}."""
    parts = sorted(out.glob("austeer_results_*.json"))
    if not parts:
        log(f"nothing to render in {out}")
        return
    reports = [json.loads(p.read_text()) for p in parts]
    order = {d: i for i, d in enumerate(CONFIGS)}
    reports.sort(key=lambda r: order.get(next(iter(r["datasets"]), ""), 99))
    merged = {"model": reports[0]["model"], "machine": reports[0]["machine"], "datasets": {},
              "runs": [{"dataset": next(iter(r["datasets"])), "wall_seconds": r.get("wall_seconds"),
                        "machine": r["machine"], "args": r["args"]} for r in reports]}
    for r in reports:
        merged["datasets"].update(r["datasets"])
    (out / "austeer_results.json").write_text(json.dumps(merged, indent=2))
    (out / "austeer_results.md").write_text(markdown(merged))
    plot(merged, out / "austeer_results.png")
    log(f"rendered {out / 'austeer_results.md'}")


LABELS = {"vanilla": "vanilla", "austeer_head": "AUSteer-Head", "austeer_ffn": "AUSteer-FFN", "caa": "CAA",
          "iti": "ITI-style heads", "random": "Random loc. (FFN)", "actdiff": "Act. diff. loc. (FFN)",
          "fixed_vector": "Fixed vector (FFN)", "fixed_strength": "Fixed strength (FFN)"}


def markdown(report: dict) -> str:
    lines = [f"# AUSteer and baselines on {report['model']}", "",
             "Hyperparameters picked on the validation slice (best cell; ties → fewer units, smaller strength), "
             "accuracy on the disjoint test slice. Δ = method − vanilla on the same test items (paired bootstrap "
             "95% CI); p = exact McNemar. Pairs come from records outside both slices.", ""]
    for ds, d in report["datasets"].items():
        lines += [f"## {ds} ({d['kind']}; val {d['n_val']}, test {d['n_test']}, {d['pairs']['n_pairs']} pairs "
                  f"from {d['pairs']['n_records']} records, negatives: {d['pairs']['negatives']})", "",
                  "| method | chosen (val acc) | #acts | test acc | 95% CI | Δ vs vanilla [95% CI] | McNemar p |",
                  "|---|---|---:|---:|---|---|---:|"]
        for name, t in d["test"].items():
            ch = t["chosen"]
            chs = "—" if not ch else ", ".join(f"{k}={v}" for k, v in ch.items() if k != "val_accuracy") \
                + f" ({ch['val_accuracy']:.3f})"
            delta = "—" if name == "vanilla" else \
                f"{t['diff_vs_vanilla']:+.3f} [{t['diff_ci_low']:+.3f}, {t['diff_ci_high']:+.3f}]"
            p = "—" if name == "vanilla" else f"{t['mcnemar_p']:.3f}"
            lines.append(f"| {LABELS.get(name, name)} | {chs} | {t['steered_activations']} | {t['accuracy']:.3f} | "
                         f"[{t['ci_low']:.3f}, {t['ci_high']:.3f}] | {delta} | {p} |")
        lines += ["", f"Localization time over {d['pairs']['n_pairs']} pairs: "
                  + ", ".join(f"{k} {v:.1f}s" for k, v in d["localization_seconds"].items()), ""]
        n_aus = d.get("n_aus") or _n_aus(report["model"])
        if d.get("top_units"):
            lines += ["Localization signal: the best momentum score found vs the 95th percentile of the best score "
                      "among the same number of AUs if every momentum sign were a fair coin (independent units; "
                      "a rough noise ceiling).", "",
                      "| site | #AUs | top score | 10th score | null 95% max |", "|---|---:|---:|---:|---:|"]
            for site, units in d["top_units"].items():
                ceil = null_max_score(d["pairs"]["n_pairs"], n_aus[site])
                lines.append(f"| {site} | {n_aus[site]} | {units[0]['score']:.3f} | {units[-1]['score']:.3f} | "
                             f"{ceil:.3f} |")
            lines.append("")
        for name, sw in d["sweeps"].items():
            res = SW.SweepResult(sw["method"], sw["row_name"], sw["col_name"], sw["rows"], sw["cols"],
                                sw["accuracy"], sw["correct"], sw["n"], sw["vanilla_accuracy"], sw["vanilla_correct"])
            lines += ["<details><summary>validation sweep: " + LABELS.get(name, name) + "</summary>", "",
                      res.markdown(), "</details>", ""]
    for run in report.get("runs", []):
        lines.append(f"- {run['dataset']}: wall time {(run['wall_seconds'] or 0) / 60:.1f} min, torch threads "
                     f"{run['machine']['torch_threads']}, load average at start "
                     f"{run['machine']['load_average_1_5_15']} (shared 2-core machine), "
                     f"{run['machine']['date_utc']}.")
    return "\n".join(lines) + "\n"


def null_max_score(n_pairs: int, n_aus: int, q: float = 0.95, sims: int = 200, seed: int = 0) -> float:
    """q-quantile of max over n_aus units of max(r_pos, r_neg) when each pair's sign is a fair coin."""
    import numpy as np

    rng = np.random.default_rng(seed)
    best = np.empty(sims)
    for i in range(sims):
        c = rng.binomial(n_pairs, 0.5, size=n_aus)
        best[i] = np.maximum(c, n_pairs - c).max() / n_pairs
    return float(np.quantile(best, q))


def _n_aus(model_name: str) -> dict:
    from transformers import AutoConfig

    from fusesteer.runtime.plan import ModelSpec

    spec = ModelSpec.from_config(AutoConfig.from_pretrained(models.cache_path(model_name), local_files_only=True))
    return {s: spec.num_layers * spec.site_width(A.resolve_site(s)) for s in A.AU_SITES}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    dss = list(report["datasets"])
    fig, axes = plt.subplots(1, len(dss), figsize=(6.5 * len(dss), 4.2), squeeze=False)
    for ax, ds in zip(axes[0], dss):
        t = report["datasets"][ds]["test"]
        names = list(t)
        acc = [t[n]["accuracy"] for n in names]
        err = [[t[n]["accuracy"] - t[n]["ci_low"] for n in names], [t[n]["ci_high"] - t[n]["accuracy"] for n in names]]
        colors = ["grey" if n == "vanilla" else "tab:green" if n.startswith("austeer") else "tab:blue"
                  if n in ("caa", "iti") else "tab:orange" for n in names]
        ax.bar(range(len(names)), acc, yerr=err, color=colors, capsize=3)
        ax.axhline(t["vanilla"]["accuracy"], color="grey", ls="--", lw=0.8)
        ax.set_xticks(range(len(names)), [LABELS.get(n, n) for n in names], rotation=40, ha="right", fontsize=8)
        ax.set_ylabel("test accuracy (95% Wilson CI)")
        ax.set_title(f"{ds} (n={t['vanilla']['n']})", fontsize=10)
        ax.set_ylim(0, 1)
    fig.suptitle(f"{report['model']}: k, α picked on validation, accuracy on held-out test", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
