"""`fusesteer eval`: accuracy of a model (optionally steered by a plan file) on a yes/no or MC dataset."""

from __future__ import annotations

import json


def register(sub, fmt):
    from ..evaluate.datasets import dataset_help

    p = sub.add_parser("eval", formatter_class=fmt, help="task accuracy with an optional steering plan",
                       description="Score every record of a yes/no or multiple-choice dataset by the "
                                   "log-likelihood of each choice (or, --scoring logits, the Yes/No next-token "
                                   "logits; --scoring generate, the greedy answer as the AUSteer authors score it) "
                                   "and report accuracy with a 95% Wilson interval. Records are taken "
                                   "in file order: --offset skips, --limit caps.",
                       epilog="examples:\n"
                              "  fusesteer eval --model smollm2-135m --dataset strategyqa --limit 200\n"
                              "  fusesteer eval --model smollm2-135m --plan plan.safetensors --dataset "
                              "truthfulqa_mc --offset 80 --json out.json\n"
                              "  fusesteer eval --model ./my-model --dataset tasks.jsonl --scoring logits\n"
                              "  fusesteer eval --dataset cause_effect --scoring generate --max-new-tokens 1")
    p.add_argument("--model", default="smollm2-135m", help="embedded model name or local HF model folder")
    p.add_argument("--plan", default=None, help="steering plan file (.safetensors) to attach")
    p.add_argument("--dataset", required=True, help=dataset_help("eval"))
    p.add_argument("--offset", type=int, default=0, help="skip the first N records")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N records")
    p.add_argument("--scoring", "--method", dest="method", default="logprob",
                   choices=["logprob", "logits", "generate"],
                   help="logprob: summed log-likelihood of each choice; logits: Yes/No next-token (yes/no only); "
                        "generate: the greedy answer, stripped and lowercased, must equal the gold letter / yes-no "
                        "/ option text (the AUSteer authors' scoring; non-answers are wrong and counted apart)")
    p.add_argument("--template", default=None, choices=["letter", "cloze"],
                   help="generate: letter = options listed A. B. ... (yes/no: a Yes/No prompt), answer a letter "
                        "(default); cloze = fusesteer's 'Question: ...\nAnswer:' prompts")
    p.add_argument("--max-new-tokens", type=int, default=1, help="generate: new tokens per answer")
    p.add_argument("--normalize", default="sum", choices=["sum", "mean"], help="sum or per-token mean log-prob")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "fold", "reference"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", dest="out_json", default=None, help="write the result (with per-item scores) here")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (a first-time model conversion is still announced in one line)")
    p.set_defaults(func=run)


def run(args):
    from ..errors import FuseSteerError
    from ..evaluate import tasks
    from ..runtime.attach import attach
    from ..runtime.plan import SteeringPlan

    if args.offset < 0:
        raise FuseSteerError(f"--offset must be >= 0, got {args.offset}")
    if args.limit is not None and args.limit < 1:
        raise FuseSteerError(f"--limit must be a positive integer, got {args.limit}")
    if args.batch_size < 1:
        raise FuseSteerError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise FuseSteerError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    if args.template is not None and args.method != "generate":
        raise FuseSteerError(f"--template {args.template} applies to --scoring generate; --scoring {args.method} "
                             f"scores the cloze prompts")
    records = tasks.load_dataset(args.dataset)
    tasks.check_kind_for("eval", tasks.task_kind(records), str(args.dataset))
    end = None if args.limit is None else args.offset + args.limit
    records = records[args.offset:end]
    if not records:
        raise FuseSteerError(f"no records of {args.dataset} left after --offset {args.offset}")
    plan = SteeringPlan.load(args.plan) if args.plan else None
    from .common import load_model

    model, tok, load_s = load_model(args.model, threads=args.threads, quiet=args.quiet)
    name = str(args.dataset)
    if plan is None:
        res = tasks.evaluate(model, tok, records, batch_size=args.batch_size, method=args.method,
                             normalize=args.normalize, progress=not args.quiet, name=name,
                                 template=args.template, max_new_tokens=args.max_new_tokens)
    else:
        with attach(model, plan, backend=args.backend):
            res = tasks.evaluate(model, tok, records, batch_size=args.batch_size, method=args.method,
                                 normalize=args.normalize, progress=not args.quiet, name=name,
                                 template=args.template, max_new_tokens=args.max_new_tokens)
    print(f"model {args.model}; plan {args.plan or '(none)'}"
          + (f" [{plan.name}]" if plan is not None and plan.name else "")
          + f"; records {args.offset}..{args.offset + len(records) - 1}")
    print(res.table())
    print(f"model load {load_s:.1f} s (not in the time column); scoring {res.elapsed_s:.1f} s")
    if args.out_json:
        out = {"model": str(args.model), "dataset": str(args.dataset), "offset": args.offset,
               "load_seconds": round(load_s, 3), "scoring_seconds": round(res.elapsed_s, 3),
               "plan": args.plan, "plan_name": None if plan is None else plan.name,
               "plan_metadata": None if plan is None else {k: v for k, v in plan.metadata.items() if k != "units"},
               "backend": args.backend if plan is not None else None, **res.to_dict()}
        with open(args.out_json, "w") as f:
            json.dump(out, f, indent=2)
    return 0
