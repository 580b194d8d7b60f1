"""AUSteer and its baselines under both protocols (``fusesteer`` and ``official``), on one model and dataset.

Records in file order, by the CLI's rule: validation = records 0..val-1, contrastive pairs from the records after
it (``--pairs`` of them), test = the ``--test`` records after the pairs' records. Per protocol
(:mod:`fusesteer.methods.protocols`): its pairs (cloze vs letter / Yes-No answer tokens) and its scoring
(forced-choice log-probability vs the greedy one-token answer, non-answers wrong) on validation and test.
Methods: vanilla, AUSteer-Head, AUSteer-FFN, CAA, ITI and random localization (AUSteer-FFN's gains on k random
units); each grid is swept on validation, its best cell evaluated once on test, with an exact McNemar p-value
against vanilla on the same test items. One streaming pass over the pairs records every site.

    python bench/experiments/austeer_protocols.py --model smollm2-135m --dataset strategyqa \\
        --val 40 --pairs 200 --test 150 --out bench/results

Writes ``austeer_protocols_<model>_<dataset>.{json,md}`` to --out. The grids default to small subsets of the
protocols' grids so that a run fits a shared 2-core CPU; the JSON records what was run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fusesteer import attach, models  # noqa: E402
from fusesteer.evaluate import stats, tasks  # noqa: E402
from fusesteer.methods import austeer as A  # noqa: E402
from fusesteer.methods import baselines as B  # noqa: E402
from fusesteer.methods import protocols  # noqa: E402
from fusesteer.methods import sweep as SW  # noqa: E402
from fusesteer.methods.pairs import make_pairs  # noqa: E402

METHODS = ("vanilla", "austeer_head", "austeer_ffn", "caa", "iti", "random")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bounds(model) -> dict:
    """The limits of every grid axis, for the grid-edge check (as the CLI sets them)."""
    n = model.config.num_hidden_layers
    return {"k": {"lo": 1}, "alpha": {"lo": 0}, "heads": {"lo": 1, "hi": n * model.config.num_attention_heads},
            "layer": {"lo": 0, "hi": n - 1, "additive": True}}


def run_protocol(model, tok, records, kind, args, proto) -> dict:
    val = records[:args.val]
    pair_recs = records[args.val:args.val + args.pairs]
    test = records[args.val + args.pairs:args.val + args.pairs + args.test]
    pairs = make_pairs(pair_recs, negatives="random", seed=0, template=proto.template)
    prov = A.provenance(args.dataset, pairs, 0, first_record=args.val, template=proto.template)
    ev_kw = dict(batch_size=args.batch_size, method=proto.scoring, progress=False,
                 template=proto.template if proto.scoring == "generate" else None, max_new_tokens=1)

    def ev(recs, plan=None):
        if plan is None:
            return tasks.evaluate(model, tok, recs, kind, **ev_kw)
        with attach(model, plan, backend="torch", check_finite=False):
            return tasks.evaluate(model, tok, recs, kind, **ev_kw)

    rep = {"protocol": proto.name, "val": [0, args.val - 1], "pairs": prov,
           "test": [args.val + args.pairs, args.val + args.pairs + len(test) - 1], "n_test": len(test),
           "scoring": proto.scoring, "template": proto.template, "methods": {}}
    t0 = time.perf_counter()
    locs = A.localize_many(model, tok, pairs, ["head", "ffn", "layer.out"], batch_size=8, provenance=prov,
                           extra={"head": {"iti": B.HeadStats(model.config.num_attention_heads)}})
    rep["localization_seconds"] = round(time.perf_counter() - t0, 1)
    head, ffn, lo = locs["attn.o_proj.in"], locs["mlp.out"], locs["layer.out"]
    rep["top_score"] = {"head": float(head.stats.scores.max()), "ffn": float(ffn.stats.scores.max())}
    log(f"{proto.name}: localized {len(pairs)} pairs in {rep['localization_seconds']}s; top scores {rep['top_score']}")
    van_val = ev(val)
    van_test = ev(test)
    van_c = van_test.correct_vector
    spec = ffn.spec
    grids = {
        "austeer_head": (args.k, args.alpha, "k", "alpha", lambda k, a: A.austeer_plan(head, k, a)),
        "austeer_ffn": (args.k, args.alpha, "k", "alpha", lambda k, a: A.austeer_plan(ffn, k, a)),
        "caa": (args.caa_layers, args.caa_scales, "layer", "scale",
                lambda l, s: B.caa_layer_plan(spec, l, lo.stats.mean_m.float()[l], s, prov)),
        "iti": (args.iti_heads, args.iti_alpha, "heads", "alpha",
                lambda K, a: B.iti_plan(head.extra["iti"], spec, K, a, prov)),
        "random": (args.k, args.alpha, "k", "alpha",
                   lambda k, a: A.build_plan(ffn, k, a, localization="random", seed=0)),
    }

    def record(name, res, chosen, val_acc):
        rep["methods"][name] = {"test_accuracy": res.accuracy, "test_correct": res.correct, "n": res.n,
                                "test_non_answers": res.non_answers, "chosen": chosen, "val_accuracy": val_acc,
                                "mcnemar_p_vs_vanilla": None if name == "vanilla" else
                                stats.mcnemar_p(res.correct_vector, van_c)}
        log(f"{proto.name}: {name} test {res.accuracy:.3f} (non-answers {res.non_answers}; chosen {chosen})")

    record("vanilla", van_test, None, van_val.accuracy)
    for name, (rows, cols, rn, cn, fn) in grids.items():
        t = time.perf_counter()
        sw = SW.sweep(model, tok, val, rows, cols, fn, method=name, row_name=rn, col_name=cn, backend="torch",
                      batch_size=args.batch_size, eval_method=proto.scoring, vanilla=van_val,
                      template=ev_kw["template"], max_new_tokens=1)
        sw.bounds = bounds(model)
        best = sw.best
        record(name, ev(test, fn(best[rn], best[cn])), {rn: best[rn], cn: best[cn]}, best["accuracy"])
        rep["methods"][name]["sweep_seconds"] = round(time.perf_counter() - t, 1)
        rep["methods"][name]["grid_edges"] = sw.edges
    return rep


def render(report: dict) -> str:
    lines = [f"# AUSteer under both protocols — {report['model']} on {report['dataset']}", "",
             f"Command: `{report['command']}`", "",
             f"Validation records 0..{report['args']['val'] - 1}, pairs from the next {report['args']['pairs']} "
             f"records, test = the {report['args']['test']} records after them (file order). Wall time "
             f"{report['seconds']:.0f} s, 1 torch thread, CPU.", "",
             "| protocol | method | chosen (validation) | val acc | test acc | non-answers | McNemar p vs vanilla |",
             "|---|---|---|---:|---:|---:|---:|"]
    for name, rep in report["protocols"].items():
        for m, r in rep["methods"].items():
            ch = ", ".join(f"{k}={v:g}" for k, v in r["chosen"].items()) if r["chosen"] else "—"
            p = "—" if r["mcnemar_p_vs_vanilla"] is None else f"{r['mcnemar_p_vs_vanilla']:.3g}"
            na = "—" if r["test_non_answers"] is None else str(r["test_non_answers"])
            lines.append(f"| {name} | {m} | {ch} | {r['val_accuracy']:.3f} | {r['test_accuracy']:.3f} "
                         f"({r['test_correct']}/{r['n']}) | {na} | {p} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="strategyqa")
    ap.add_argument("--protocols", nargs="+", default=list(protocols.PROTOCOLS), choices=list(protocols.PROTOCOLS))
    ap.add_argument("--val", type=int, default=40)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--test", type=int, default=150)
    ap.add_argument("--k", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--alpha", type=float, nargs="+", default=[8.0, 15.0, 50.0])
    ap.add_argument("--caa-layers", type=int, nargs="+", default=None, help="default: 20/40/60%% of the depth")
    ap.add_argument("--caa-scales", type=float, nargs="+", default=[1.0, 4.0])
    ap.add_argument("--iti-heads", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--iti-alpha", type=float, nargs="+", default=[1.0, 5.0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = models.load(args.model, progress=False)
    n = model.config.num_hidden_layers
    args.caa_layers = args.caa_layers or sorted({round(f * n) for f in (0.2, 0.4, 0.6)})
    records = tasks.load_dataset(args.dataset)
    kind = tasks.task_kind(records)
    if args.val + args.pairs + args.test > len(records):
        raise SystemExit(f"{args.dataset} has {len(records)} records; --val + --pairs + --test exceed it")
    report = {"model": args.model, "dataset": args.dataset, "args": vars(args),
              "command": "python bench/experiments/austeer_protocols.py " + " ".join(sys.argv[1:] if argv is None
                                                                                    else argv),
              "protocols": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"austeer_protocols_{args.model}_{args.dataset}"
    for name in args.protocols:
        report["protocols"][name] = run_protocol(model, tok, records, kind, args, protocols.get(name))
        report["seconds"] = time.perf_counter() - t0
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
