"""`fusesteer demo`."""


def register(sub, fmt):
    p = sub.add_parser("demo", formatter_class=fmt, help="steer the embedded default model end to end",
                       description="Load the embedded model, build a CAA plan from a few contrastive pairs, "
                                   "generate unsteered vs steered, report parity and the time ratio.",
                       epilog="example:\n  fusesteer demo --scale 0.5 --layers 12")
    p.add_argument("--model", default="smollm2-135m", help="embedded model name or local HF folder")
    p.add_argument("--pairs", type=int, default=16, help="number of contrastive pairs")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="layers to steer (default: the one at 0.4 L)")
    p.add_argument("--scale", type=float, default=0.5, help="multiplier of the mean difference")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "fold", "reference"])
    p.add_argument("--cycles", type=int, default=40, help="interleaved timing steps")
    p.add_argument("--json", dest="out_json", default=None, help="also write the report as JSON here")
    p.set_defaults(func=run)


def run(args):
    from ..demo import run_demo

    run_demo(args.model, n_pairs=args.pairs, layers=args.layers, scale=args.scale,
             max_new_tokens=args.max_new_tokens, backend=args.backend, cycles=args.cycles, out_json=args.out_json)
    return 0
