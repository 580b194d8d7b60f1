"""`fusesteer baseline build|sweep`: the baselines AUSteer is compared with, from the same contrastive pairs.

Methods (each a plan in the same runtime and evaluation harness as AUSteer):

    caa             mean layer.out difference at the last token, added at one layer   (grid: --layer x --scale)
    iti             ITI-style shifts of the K most separating heads on attn.o_proj.in (grid: --heads x --alpha)
    random          k random AUs at --site, AUSteer's adaptive gains                 (grid: --k x --alpha)
    actdiff         top-k AUs by |mean activation difference|, adaptive gains         (grid: --k x --alpha)
    fixed_vector    AUSteer's top-k AUs, a fixed shift b = alpha * mean m             (grid: --k x --alpha)
    fixed_strength  AUSteer's top-k AUs, gamma = +-alpha regardless of r              (grid: --k x --alpha)

Records are used in file order, by the same rule as `fusesteer austeer`: {rule}
"""

from __future__ import annotations

import sys

from .austeer import (
    PAIRS_RULE,
    _check_positive,
    _common,
    _load_model,
    _pairs_from,
    finish_sweep,
    resolve_protocol,
    sweep_arguments,
    validation_records,
)

__doc__ = __doc__.format(rule=PAIRS_RULE)

METHODS = ("caa", "iti", "random", "actdiff", "fixed_vector", "fixed_strength")
_GRID = {"caa": ("layer", "scale"), "iti": ("heads", "alpha")}


def register(sub, fmt):
    p = sub.add_parser("baseline", formatter_class=fmt, help="baselines (CAA, ITI, AUSteer ablations): build, sweep",
                       description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
                       epilog="examples:\n"
                              "  fusesteer baseline build --method caa --dataset strategyqa --layer 12 --scale 4 "
                              "-o caa.safetensors\n"
                              "  fusesteer baseline sweep --method iti --dataset truthfulqa_mc --val 30 --heads 4 "
                              "16 --alpha 1 5 15 --out iti/")
    s = p.add_subparsers(dest="baseline_cmd", metavar="ACTION")
    s.required = True
    b = s.add_parser("build", formatter_class=fmt, help="build one baseline plan",
                     description="Stream contrastive pairs through the model once and write one baseline plan."
                                 "\n\n" + PAIRS_RULE,
                     epilog="examples:\n"
                            "  fusesteer baseline build --method caa --dataset strategyqa --layer 12 --scale 4 "
                            "-o caa.safetensors\n"
                            "  fusesteer baseline build --method fixed_strength --site ffn --k 20 --alpha 5 "
                            "--dataset strategyqa -o fs.safetensors")
    _common(b, "build", "baseline")
    b.add_argument("--method", required=True, choices=METHODS)
    b.add_argument("--layer", type=int, default=None, help="caa: the layer (default: 40%% of the depth)")
    b.add_argument("--scale", type=float, default=4.0, help="caa: the multiplier of the mean difference")
    b.add_argument("--heads", type=int, default=16, help="iti: number of heads K")
    b.add_argument("--k", type=int, default=20, help="AUSteer ablations: number of AUs")
    b.add_argument("--alpha", type=float, default=5.0, help="iti and AUSteer ablations: strength")
    b.add_argument("-o", "--output", required=True, help="plan file to write (.safetensors)")
    b.set_defaults(func=run_build)

    w = s.add_parser("sweep", formatter_class=fmt, help="validation sweep of a baseline's two parameters",
                     description="Localize once on the pairs, then evaluate the method's grid on the first --val "
                                 "records (one attach per row value, in-place updates per column value). Writes "
                                 "results.json, results.md and heatmap.png to --out, with the exact `baseline "
                                 "build` command of the best cell and warnings for a pair shortfall or a best "
                                 "cell on an edge of the grid.\n\n" + PAIRS_RULE,
                     epilog="example:\n"
                            "  fusesteer baseline sweep --method caa --dataset strategyqa --val 60 --layer 6 12 18 "
                            "--scale 1 4 8 --out caa/")
    _common(w, "sweep", "baseline")
    sweep_arguments(w)
    w.add_argument("--method", required=True, choices=METHODS)
    w.add_argument("--layer", type=int, nargs="+", default=None, help="caa rows (default: 20/40/60%% depth)")
    w.add_argument("--scale", type=float, nargs="+", default=[1, 2, 4, 8], help="caa columns")
    w.add_argument("--heads", type=int, nargs="+", default=[4, 16, 48], help="iti rows")
    w.add_argument("--k", type=int, nargs="+", default=[5, 20, 100], help="ablation rows")
    w.add_argument("--alpha", type=float, nargs="+", default=[1, 5, 15], help="iti and ablation columns")
    w.set_defaults(func=run_sweep)


def _localize(args, model, tok, prs, prov):
    """(plan_fn(row, col), n_units_total) of the method, from one pass over the pairs."""
    from ..errors import FuseSteerError
    from ..methods import austeer as A
    from ..methods import baselines as B

    spec_heads = model.config.num_attention_heads
    if args.method == "caa":
        loc = A.localize(model, tok, prs, "layer.out", batch_size=args.batch_size, provenance=prov,
                         progress=not args.quiet)
        vecs = loc.stats.mean_m.float()  # mean layer.out difference at the last token (CAA)
        return (lambda layer, scale: B.caa_layer_plan(loc.spec, int(layer), vecs[int(layer)], scale, prov)), loc
    if args.method == "iti":
        loc = A.localize(model, tok, prs, "head", batch_size=args.batch_size, provenance=prov,
                         extra={"iti": B.HeadStats(spec_heads)}, progress=not args.quiet)
        hs = loc.extra["iti"]
        return (lambda K, alpha: B.iti_plan(hs, loc.spec, int(K), alpha, prov)), loc
    loc = A.localize(model, tok, prs, args.site, batch_size=args.batch_size, provenance=prov,
                     progress=not args.quiet)
    fn = B.ABLATIONS[args.method]
    total = loc.stats.shape[0] * loc.stats.shape[1]

    def plan(k, alpha):
        if int(k) > total:
            raise FuseSteerError(f"--k {k} exceeds the {total} AUs of site {loc.site}")
        return fn(loc, int(k), alpha)
    return plan, loc


def _check_layers(layers, n):
    from ..errors import FuseSteerError

    for layer in layers:
        if not 0 <= layer < n:
            raise FuseSteerError(f"--layer {layer} is out of range: the model has layers 0..{n - 1}")


def run_build(args):
    resolve_protocol(args)
    _check_positive("k", args.k)
    _check_positive("heads", args.heads)
    prs, prov, _, warnings = _pairs_from(args)
    model, tok = _load_model(args)
    n = model.config.num_hidden_layers
    plan_fn, loc = _localize(args, model, tok, prs, prov)
    if args.method == "caa":
        layer = round(0.4 * n) if args.layer is None else args.layer
        _check_layers([layer], n)
        plan = plan_fn(layer, args.scale)
    elif args.method == "iti":
        plan = plan_fn(args.heads, args.alpha)
    else:
        plan = plan_fn(args.k, args.alpha)
    plan.metadata["model"] = str(args.model)
    if warnings:
        plan.metadata["warnings"] = warnings
    plan.save(args.output)
    print(f"{args.method} plan: {len(plan.entries)} entries from {loc.n_pairs} pairs ({loc.seconds:.1f}s) -> "
          f"{args.output}")
    return 0


def run_sweep(args):
    from ..errors import FuseSteerError
    from ..methods import sweep as SW

    proto = resolve_protocol(args)
    eval_ds, val = validation_records(args)
    for a in args.alpha + args.scale:
        if a != a or a in (float("inf"), float("-inf")):
            raise FuseSteerError(f"grid values must be finite, got {a}")
    prs, prov, start, warnings = _pairs_from(args)
    model, tok = _load_model(args)
    n = model.config.num_hidden_layers
    row_name, col_name = _GRID.get(args.method, ("k", "alpha"))
    if args.method == "caa":
        rows = args.layer or sorted({round(f * n) for f in (0.2, 0.4, 0.6)})
        _check_layers(rows, n)
        cols = args.scale
    elif args.method == "iti":
        rows, cols = args.heads, args.alpha
    else:
        rows, cols = args.k, args.alpha
    if row_name != "layer":
        for r in rows:
            _check_positive(row_name, r)
    plan_fn, loc = _localize(args, model, tok, prs, prov)
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    res = SW.sweep(model, tok, val, rows, cols, plan_fn, method=args.method, row_name=row_name,
                   col_name=col_name, backend=args.backend, batch_size=args.batch_size, log=log,
                   eval_method=args.scoring, template=proto.template, max_new_tokens=args.max_new_tokens)
    res.info = {"model": str(args.model), "method": args.method, "protocol": args.protocol, "pairs": prov,
                "validation": {"dataset": str(eval_ds), "records": f"0..{args.val - 1}", "n": args.val,
                               "scoring": args.scoring, "template": proto.template,
                               "max_new_tokens": args.max_new_tokens}}
    res.bounds = _bounds(args.method, loc, model)
    finish_sweep(args, res, warnings, start, plan_fn, f"{args.method} on {eval_ds}")
    return 0


def _bounds(method, loc, model) -> dict:
    """The limits of each grid axis of ``method`` (for the grid-edge warnings)."""
    n = model.config.num_hidden_layers
    if method == "caa":
        return {"layer": {"lo": 0, "hi": n - 1, "additive": True}}  # the scale may take any sign
    if method == "iti":
        return {"heads": {"lo": 1, "hi": n * model.config.num_attention_heads}, "alpha": {"lo": 0}}
    return {"k": {"lo": 1, "hi": loc.stats.shape[0] * loc.stats.shape[1]}, "alpha": {"lo": 0}}
