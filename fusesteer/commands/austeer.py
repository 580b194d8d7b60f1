"""`fusesteer austeer build|sweep`: AUSteer plans from contrastive pairs, and (k, α) sweeps on validation data.

Records are used in file order (the bundled dev files are already shuffled). {rule} So the three verbs
line up:

    fusesteer austeer sweep --dataset strategyqa --val 60 --pairs 300 ...   # val = records 0..59,
                                                                           # pairs from records 60..359
    fusesteer austeer build --dataset strategyqa --val 60 --pairs 300 --k K --alpha A -o plan.safetensors
    fusesteer eval --dataset strategyqa --plan plan.safetensors --offset 360 --limit 200   # held-out test

A sweep writes the exact `build` command of its best cell into results.json and results.md.
"""

from __future__ import annotations

import shlex
import sys

from .common import warn

#: the validation slice of a sweep, and what build skips by default: the first VAL_DEFAULT records
VAL_DEFAULT = 60
#: the one rule for which records localize, said in every verb's help
PAIRS_RULE = ("Which records localize (build and sweep alike): pairs come from the records after the first "
              "--val (default 60), which are the validation slice of `sweep`; --offset N starts them at record "
              "N instead (sweep: N >= --val). --pairs-file replaces the dataset.")

__doc__ = __doc__.format(rule=PAIRS_RULE)


def _common(p, action: str, verb: str = "austeer"):
    from ..evaluate.datasets import dataset_help
    from ..methods.protocols import PROTOCOLS

    p.set_defaults(action=action)

    p.add_argument("--model", default="smollm2-135m", help="embedded model name or local HF model folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", default=None, help=dataset_help(verb))
    src.add_argument("--pairs-file", default=None,
                     help="JSONL of {prompt, positive, negative} pairs instead of --dataset")
    p.add_argument("--site", default="head", choices=["head", "ffn", "down"],
                   help="head = attn.o_proj.in (AUSteer-Head), ffn = mlp.out (AUSteer-FFN), "
                        "down = mlp.down_proj.in")
    p.add_argument("--protocol", default="fusesteer", choices=list(PROTOCOLS),
                   help="fusesteer: cloze pairs, forced-choice scoring; official: the AUSteer authors' protocol "
                        "(options in the prompt, letter/Yes-No answer pairs, one per record, greedy "
                        "generated-answer scoring, 1000 pairs, the paper's grid)")
    p.add_argument("--pairs", type=int, default=None,
                   help="number of contrastive pairs; None: by protocol (" + ", ".join(
                       f"{n}: {pr.build_pairs if action == 'build' else pr.sweep_pairs}"
                       for n, pr in PROTOCOLS.items()) + ")")
    p.add_argument("--val", type=int, default=VAL_DEFAULT,
                   help="the first N records are the validation slice: sweep evaluates on them, no verb "
                        "localizes on them")
    p.add_argument("--offset", type=int, default=None,
                   help="first record used for pairs; None: --val")
    p.add_argument("--negatives", default=None, choices=["random", "all"],
                   help="multiple choice: one random wrong choice per record (None: random), or one pair per "
                        "wrong choice (--protocol fusesteer only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the wrong-choice draw")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward (2x rows)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(sub, fmt):
    from ..methods.protocols import PROTOCOLS

    p = sub.add_parser("austeer", formatter_class=fmt, help="AUSteer: build plans and sweep (k, alpha)",
                       description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
                       epilog="examples:\n"
                              "  fusesteer austeer build --model smollm2-135m --dataset strategyqa --site ffn "
                              "--k 20 --alpha 10 --pairs 1000 -o plan.safetensors\n"
                              "  fusesteer austeer sweep --model smollm2-135m --dataset strategyqa --val 60 "
                              "--k 5 10 20 50 100 --alpha 1 5 10 20 50 100 --out sweep/")
    s = p.add_subparsers(dest="austeer_cmd", metavar="ACTION")
    s.required = True

    b = s.add_parser("build", formatter_class=fmt, help="localize AUs and write a plan file",
                     description="Stream contrastive pairs through the model, rank every AU of the site over all "
                                 "layers by its momentum score max(r_pos, r_neg), keep the global top-k and write "
                                 "a plan with gains a = 1 + gamma (gamma = +alpha*r_pos or -alpha*r_neg).\n\n"
                                 + PAIRS_RULE,
                     epilog="examples:\n"
                            "  fusesteer austeer build --dataset strategyqa --site head --k 20 --alpha 10 "
                            "--pairs 1000 -o head.safetensors\n"
                            "  fusesteer austeer build --pairs-file pairs.jsonl --site ffn --k 50 --alpha 5 "
                            "-o ffn.safetensors\n"
                            "  fusesteer austeer build --dataset truthfulqa_mc --negatives all --val 30 "
                            "--pairs 200 -o tqa.safetensors")
    _common(b, "build")
    b.add_argument("--ties", default="paper", choices=["paper", "code"],
                   help="sign of a unit with r_pos = r_neg: negative (the paper's eq. 4) or positive (the authors' "
                        "code)")
    b.add_argument("--k", type=int, default=20, help="number of AUs to steer (global over layers)")
    b.add_argument("--alpha", type=float, default=10.0, help="global steering strength")
    b.add_argument("-o", "--output", required=True, help="plan file to write (.safetensors)")
    b.add_argument("--show", type=int, default=10, help="print the top N chosen units")
    b.set_defaults(func=run_build)

    w = s.add_parser("sweep", formatter_class=fmt, help="validation sweep of (k, alpha): table + heatmap",
                     description="Localize once on the pairs, then evaluate every (k, alpha) on the first --val "
                                 "records (one attach per k, in-place value updates per alpha). Writes "
                                 "results.json, results.md and heatmap.png to --out, with the exact `build` "
                                 "command of the best cell and warnings when fewer pairs were used than asked "
                                 "or the best cell lies on an edge of the grid.\n\n" + PAIRS_RULE,
                     epilog="example:\n"
                            "  fusesteer austeer sweep --model smollm2-135m --dataset strategyqa --val 60 "
                            "--pairs 300 --k 5 10 20 50 100 --alpha 1 5 10 20 50 100 --out sweep/")
    _common(w, "sweep")
    sweep_arguments(w, "--method")
    w.add_argument("--ties", default="paper", choices=["paper", "code"], help="as for build")
    w.add_argument("--k", type=int, nargs="+", default=None,
                   help="k grid; None: the protocol's (" + "; ".join(
                       f"{n}: {' '.join(map(str, pr.k_grid))}" for n, pr in PROTOCOLS.items()) + ")")
    w.add_argument("--alpha", type=float, nargs="+", default=None,
                   help="alpha grid; None: the protocol's (" + "; ".join(
                       f"{n}: {' '.join(f'{a:g}' for a in pr.alpha_grid)}" for n, pr in PROTOCOLS.items()) + ")")
    w.set_defaults(func=run_sweep)


def sweep_arguments(w, *aliases) -> None:
    """The options every validation sweep shares (AUSteer and the baselines); ``aliases`` of --scoring."""
    w.add_argument("--scoring", *aliases, dest="scoring", default=None, choices=["logprob", "logits", "generate"],
                   help="validation scoring; None: the protocol's (fusesteer: logprob, official: generate)")
    w.add_argument("--max-new-tokens", type=int, default=1, help="generate scoring: new tokens per answer")
    w.add_argument("--eval-dataset", default=None,
                   help="validation dataset when pairs come from --pairs-file (default: --dataset)")
    w.add_argument("--backend", default="torch", choices=["torch", "triton", "reference"],
                   help="runtime backend (must support in-place updates)")
    w.add_argument("--out", required=True, help="output directory")
    w.add_argument("--save-best", action="store_true", help="also write the best plan to OUT/best_plan.safetensors")


def resolve_protocol(args):
    """Fill the options left at None from ``--protocol`` (pairs, negatives; for a sweep also its scoring and,
    for AUSteer, its grid) and check that the rest fit it. Returns the Protocol."""
    from ..errors import FuseSteerError
    from ..methods.protocols import get

    proto = get(args.protocol)
    if args.pairs is None:
        args.pairs = proto.build_pairs if args.action == "build" else proto.sweep_pairs
    if args.negatives is None:
        args.negatives = "random"
    elif args.negatives == "all" and proto.name == "official":
        raise FuseSteerError("--protocol official builds one pair per record (the other or a seeded random "
                             "wrong option); --negatives all belongs to --protocol fusesteer")
    if args.action == "sweep":
        if args.scoring is None:
            args.scoring = proto.scoring
        _check_positive("max-new-tokens", args.max_new_tokens)
        if args.command == "austeer":
            args.k = list(proto.k_grid) if args.k is None else args.k
            args.alpha = list(proto.alpha_grid) if args.alpha is None else args.alpha
    return proto


def pair_start(args) -> int:
    """The first record contrastive pairs come from: ``--offset`` if given, else ``--val`` (see PAIRS_RULE)."""
    from ..errors import FuseSteerError

    if args.val < 0:
        raise FuseSteerError(f"--val must be >= 0, got {args.val}")
    if args.offset is None:
        return args.val
    if args.offset < 0:
        raise FuseSteerError(f"--offset must be >= 0, got {args.offset}")
    return args.offset


def build_command(args, start: int, cell: dict, output: str) -> dict:
    """``{"command", "argv"}``: the `build` command of the same verb that rebuilds one cell of a sweep from the
    same pairs (``cell``: {option: value}, e.g. {"k": 20, "alpha": 10.0})."""
    argv = ["fusesteer", args.command, "build"]
    if args.command == "baseline":
        argv += ["--method", args.method]
    argv += ["--model", str(args.model), "--protocol", args.protocol]
    if args.pairs_file:
        argv += ["--pairs-file", str(args.pairs_file)]
    else:
        argv += ["--dataset", str(args.dataset), "--offset", str(start), "--negatives", args.negatives,
                 "--seed", str(args.seed)]
    argv += ["--site", args.site, "--pairs", str(args.pairs), "--batch-size", str(args.batch_size)]
    if getattr(args, "ties", "paper") != "paper":
        argv += ["--ties", args.ties]
    for k, v in cell.items():
        argv += [f"--{k}", str(v)]
    argv += ["-o", str(output)]
    return {"command": shlex.join(argv), "argv": argv}


def validation_records(args):
    """(dataset name, the first --val records): the validation slice of a sweep."""
    from ..errors import FuseSteerError
    from ..evaluate import tasks

    _check_positive("val", args.val)
    eval_ds = args.eval_dataset or args.dataset
    if not eval_ds:
        raise FuseSteerError("with --pairs-file, give the validation data with --eval-dataset NAME|PATH")
    records = tasks.load_dataset(eval_ds)
    tasks.check_kind_for(args.command, tasks.task_kind(records), str(eval_ds))
    if args.val >= len(records) and not args.pairs_file:
        raise FuseSteerError(f"--val {args.val} leaves no records of {eval_ds} ({len(records)}) for pairs")
    if not args.pairs_file and pair_start(args) < args.val:
        raise FuseSteerError(f"--offset {args.offset} would localize on the validation records 0..{args.val - 1}; "
                             f"give --offset >= {args.val} or leave it out")
    return eval_ds, records[:args.val]


def _check_positive(name, v):
    from ..errors import FuseSteerError

    if v is not None and v < 1:
        raise FuseSteerError(f"--{name} must be a positive integer, got {v}")


def _load_model(args):
    from .common import load_model

    model, tok, _ = load_model(args.model, threads=args.threads, quiet=args.quiet)
    return model, tok


def _pairs_from(args):
    """``(pairs, provenance, start, warnings)``: the contrastive pairs by the one rule (:func:`pair_start`);
    fewer pairs than ``--pairs`` gives a warning (printed, and returned for the results)."""
    from ..errors import FuseSteerError
    from ..evaluate import tasks
    from ..methods import austeer
    from ..methods import pairs as P
    from ..methods.protocols import get

    _check_positive("pairs", args.pairs)
    start = pair_start(args)
    if args.pairs_file:
        prs = P.load_pairs(args.pairs_file, limit=args.pairs)
        prov = austeer.provenance(args.pairs_file, prs, None, source="pairs-file", requested=args.pairs)
        why = f"{args.pairs_file} holds only {len(prs)} pairs"
    else:
        if not args.dataset:
            raise FuseSteerError("give --dataset NAME|PATH or --pairs-file PATH")
        records = tasks.load_dataset(args.dataset)
        tasks.check_kind_for(args.command, tasks.task_kind(records), str(args.dataset))
        if start >= len(records):
            raise FuseSteerError(f"{args.dataset} has {len(records)} records; none left for pairs from record "
                                 f"{start} on (--val {args.val}, --offset {args.offset})")
        template = get(args.protocol).template
        prs = P.make_pairs(records[start:], negatives=args.negatives, seed=args.seed, limit=args.pairs,
                           template=template)
        prov = austeer.provenance(args.dataset, prs, args.seed, first_record=start, negatives=args.negatives,
                                  requested=args.pairs, protocol=args.protocol, template=template)
        per = "one per record" if args.negatives == "random" else "one per wrong choice"
        why = (f"records {start}..{len(records) - 1} of {args.dataset} ({len(records) - start} records, {per}) "
               f"give only {len(prs)}" + (f"; records 0..{start - 1} are held out (--val/--offset)" if start else ""))
    warnings = []
    if len(prs) < args.pairs:
        prov["shortfall"] = args.pairs - len(prs)
        warnings.append(f"--pairs {args.pairs} asked, {len(prs)} used: {why}")
        warn(warnings[-1])
    return prs, prov, start, warnings


def run_build(args):
    from ..errors import FuseSteerError
    from ..methods import austeer

    resolve_protocol(args)
    _check_positive("k", args.k)
    prs, prov, _, warnings = _pairs_from(args)
    model, tok = _load_model(args)
    loc = austeer.localize(model, tok, prs, args.site, batch_size=args.batch_size, provenance=prov,
                           progress=not args.quiet)
    total = loc.stats.shape[0] * loc.stats.shape[1]
    if args.k > total:
        raise FuseSteerError(f"--k {args.k} exceeds the {total} AUs of site {loc.site}")
    plan = austeer.austeer_plan(loc, args.k, args.alpha, ties=args.ties)
    plan.metadata["localization_seconds"] = round(loc.seconds, 3)
    plan.metadata["model"] = str(args.model)
    if warnings:
        plan.metadata["warnings"] = warnings
    plan.save(args.output)
    print(f"AUSteer-{args.site} plan: site {loc.site}, k={args.k}, alpha={args.alpha}, {loc.n_pairs} pairs "
          f"localized in {loc.seconds:.1f}s; {len(plan.entries)} layer entries -> {args.output}")
    units = plan.metadata["units"]
    n = min(args.show, len(units))
    if n:
        print(f"\ntop {n} of {len(units)} units:")
        print("| rank | layer | dim | score | r_pos | r_neg | gamma |\n|---:|---:|---:|---:|---:|---:|---:|")
        for i, u in enumerate(units[:n]):
            print(f"| {i + 1} | {u['layer']} | {u['dim']} | {u['score']:.3f} | {u['r_pos']:.3f} | "
                  f"{u['r_neg']:.3f} | {u['gamma']:+.3f} |")
    return 0


def run_sweep(args):
    from ..errors import FuseSteerError
    from ..methods import austeer
    from ..methods import sweep as SW

    proto = resolve_protocol(args)
    for k in args.k:
        _check_positive("k", k)
    for a in args.alpha:
        if a < 0:
            raise FuseSteerError(f"--alpha values must be >= 0, got {a}")
    eval_ds, val = validation_records(args)
    prs, prov, start, warnings = _pairs_from(args)
    model, tok = _load_model(args)
    loc = austeer.localize(model, tok, prs, args.site, batch_size=args.batch_size, provenance=prov,
                           progress=not args.quiet)
    total = loc.stats.shape[0] * loc.stats.shape[1]
    bad = [k for k in args.k if k > total]
    if bad:
        raise FuseSteerError(f"--k {bad} exceed the {total} AUs of site {loc.site}")
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    plan_fn = lambda k, a: austeer.austeer_plan(loc, k, a, ties=args.ties)
    res = SW.sweep(model, tok, val, args.k, args.alpha, plan_fn, method=f"AUSteer-{args.site}", backend=args.backend,
                   batch_size=args.batch_size, eval_method=args.scoring, log=log, template=proto.template,
                   max_new_tokens=args.max_new_tokens)
    res.info = {"model": str(args.model), "site": loc.site, "protocol": args.protocol, "ties": args.ties,
                "validation": {"dataset": str(eval_ds), "records": f"0..{args.val - 1}", "n": len(val),
                               "scoring": args.scoring, "template": proto.template,
                               "max_new_tokens": args.max_new_tokens},
                "pairs": prov, "localization_seconds": round(loc.seconds, 3)}
    res.bounds = {"k": {"lo": 1, "hi": total}, "alpha": {"lo": 0}}
    finish_sweep(args, res, warnings, start, plan_fn, f"AUSteer-{args.site} on {eval_ds}")
    return 0


def finish_sweep(args, res, warnings, start, plan_fn, title) -> None:
    """Attach the warnings and the reproduce command of the best cell, save the best plan if asked, write and
    print the results; every grid-edge warning is also said on stderr."""
    from pathlib import Path

    best = res.best
    res.warnings = list(warnings)
    plan_file = Path(args.out) / "best_plan.safetensors"
    res.reproduce = build_command(args, start, {res.row_name: best[res.row_name],
                                                         res.col_name: best[res.col_name]}, str(plan_file))
    res.reproduce["plan"] = str(plan_file) if args.save_best else None
    if args.save_best:
        plan = plan_fn(best[res.row_name], best[res.col_name])
        plan.metadata["model"] = str(args.model)
        if warnings:
            plan.metadata["warnings"] = list(warnings)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        plan.save(plan_file)
    paths = res.write(args.out, title=title)
    for w in res.all_warnings[len(warnings):]:
        warn(w)
    print(res.markdown())
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
