"""`fusesteer fusion optimize|eval` — Fusion Steering per-prompt search and its evaluation."""

from __future__ import annotations

OPT_EPILOG = """examples:
  # 40 FreshQA prompts, optimize (alpha, gamma) per prompt where the baseline fails
  fusesteer fusion optimize --model smollm2-135m --dataset freshqa --limit 40 --trials 16 \\
      --mode segmented --out runs/fq
  # both modes, answer-only references, 8-bit weights (bitsandbytes)
  fusesteer fusion optimize --model smollm2-135m --dataset strategyqa --limit 20 --mode full segmented \\
      --variant answer --quantization 8bit --out runs/sqa
  # two workers sharing one study database (run each command in its own shell)
  fusesteer fusion optimize --dataset freshqa --limit 40 --storage sqlite:///runs/fq/studies.db \\
      --out runs/fq --worker 0
  fusesteer fusion optimize --dataset freshqa --limit 40 --storage sqlite:///runs/fq/studies.db \\
      --out runs/fq --worker 1
  # PostgreSQL storage
  fusesteer fusion optimize --dataset freshqa --storage postgresql://user@host/db --out runs/fq

An interrupted run resumes where it stopped when run again with the same --out/--storage (COMPLETE trials
are kept, only missing ones run). Trials of a killed process are failed after their heartbeat grace period;
--fail-running fails them at once (only when no other worker is alive)."""

EVAL_EPILOG = """examples:
  fusesteer fusion eval --model smollm2-135m --dataset freshqa --plans runs/fq --out runs/fq/eval
  fusesteer fusion eval --model smollm2-135m --plans runs/fq --out runs/fq/eval --judge /models/judge-llm

Writes fusion_eval.json (every answer and grade), fusion_eval.md (table on baseline-failed prompts) and
fusion_eval.png (accuracy and SimpleQA grade by arm)."""


def register(sub, fmt):
    from ..evaluate.datasets import dataset_help

    p = sub.add_parser("fusion", formatter_class=fmt, help="Fusion Steering: per-prompt search and evaluation",
                       description="Fusion Steering (arXiv 2505.22572): enriched reference activations, "
                                   "full-layer / segmented plans, Optuna search per prompt, grading.")
    fsub = p.add_subparsers(dest="fusion_command", metavar="ACTION")
    fsub.required = True

    o = fsub.add_parser("optimize", formatter_class=fmt, epilog=OPT_EPILOG,
                        help="optimize per-prompt plans over a dataset",
                        description="Baseline answers → prompts where the baseline fails → enriched reference "
                                    "(h, mu, delta) → Optuna search of (alpha, gamma) per prompt → plan files.")
    _common(o)
    o.add_argument("--dataset", required=True, help=dataset_help("fusion"))
    o.add_argument("--limit", type=int, default=None, help="first N records")
    o.add_argument("--offset", type=int, default=0, help="skip the first N records")
    o.add_argument("--trials", type=int, default=16, help="COMPLETE trials per prompt and mode")
    o.add_argument("--max-new-tokens", type=int, default=24,
                   help="answer length bound (greedy decoding; eval reuses it)")
    o.add_argument("--mode", nargs="+", default=["segmented"], choices=["full", "segmented"],
                   help="plan mode(s): full-layer (one alpha, gamma) or segmented (early/middle/late thirds)")
    o.add_argument("--variant", nargs="+", default=["explanation"], choices=["explanation", "answer"],
                   help="reference: answer + explanation (paper) or answer only (ablation)")
    o.add_argument("--explanation", default="auto", choices=["auto", "dataset", "generate"],
                   help="explanation source: the record's field, the model's own, or the field if present")
    o.add_argument("--blend", default="paper", choices=["paper", "interp"],
                   help="paper: a=1, b=alpha*gamma*delta; interp: a=1-alpha, b=(1-alpha)*gamma*delta+alpha*h")
    o.add_argument("--gating", default="all", choices=["all", "generated"],
                   help="steer every token (paper) or from the last prompt token on (reuses the prompt's prefill)")
    o.add_argument("--lam", type=float, default=0.3, help="weight of the normalised perplexity in the objective")
    o.add_argument("--ppl-cap", type=float, default=1000.0, help="perplexity normalisation cap (score uses "
                                                                  "min(1, log ppl / log cap))")
    o.add_argument("--no-repetition-guard", action="store_true",
                   help="paper-literal objective: overlap - lam*normalised perplexity only (the default also "
                        "counts the share of repeated token bigrams as disfluency)")
    o.add_argument("--batch", type=int, default=4, help="trials decoded together as rows of one batch")
    o.add_argument("--storage", default=None, help="optuna RDB URL or SQLite path (default: OUT/studies.db)")
    o.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    o.add_argument("--worker", type=int, default=0, help="worker index (offsets the sampler seed)")
    o.add_argument("--all-prompts", action="store_true", help="optimize every prompt, not only baseline failures")
    o.add_argument("--fail-running", action="store_true",
                   help="mark RUNNING trials of dead processes FAIL at start (no other worker may be alive)")
    o.add_argument("--heartbeat", type=int, default=10, help="heartbeat interval in seconds (0 disables)")
    o.add_argument("--out", required=True, help="output folder (plans/, refs/, results/, baseline/)")
    o.set_defaults(func=run_optimize)

    e = fsub.add_parser("eval", formatter_class=fmt, epilog=EVAL_EPILOG,
                        help="evaluate optimized plans against the baseline",
                        description="Regenerate baseline and every plan of an optimize run (plus dataset-average "
                                    "alpha/gamma arms), grade them, report on baseline-failed prompts.")
    _common(e)
    e.add_argument("--dataset", default=None, help="dataset the plans were optimized on (truths); default: the "
                                                   "truths stored with the plans")
    e.add_argument("--plans", required=True, help="output folder of `fusesteer fusion optimize`")
    e.add_argument("--judge", default="rule", help="'rule' (deterministic) or a local HF model folder/name")
    e.add_argument("--no-average", action="store_true", help="skip the dataset-average alpha/gamma arms")
    e.add_argument("--out", required=True, help="folder for fusion_eval.{json,md,png}")
    e.set_defaults(func=run_eval)


def _common(p):
    p.add_argument("--model", default="smollm2-135m", help="embedded model name or local HF folder")
    p.add_argument("--quantization", default="none", choices=["none", "8bit", "4bit"],
                   help="bitsandbytes weight quantization")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _load(args):
    from .common import load_model

    q = None if args.quantization == "none" else args.quantization
    model, tok, _ = load_model(args.model, threads=args.threads, quiet=args.no_progress, quantization=q)
    return model, tok


def _positive(name, v):
    from ..methods.fusion import FusionError

    if v is not None and v < 1:
        raise FusionError(f"--{name} must be a positive integer, got {v}")


def run_optimize(args):
    import json

    from ..evaluate.tasks import load_dataset
    from ..methods.fusion import FusionError, optimize_records

    _positive("trials", args.trials)
    _positive("batch", args.batch)
    _positive("max-new-tokens", args.max_new_tokens)
    if args.offset < 0:
        raise FusionError(f"--offset must be >= 0, got {args.offset}")
    limit = None if args.limit is None else args.offset + args.limit
    records = load_dataset(args.dataset, limit=limit)[args.offset:]
    if not records:
        raise FusionError("no records selected (check --offset/--limit)")
    model, tok = _load(args)
    tag = args.dataset if "/" not in args.dataset and "\\" not in args.dataset else \
        args.dataset.replace("\\", "/").rsplit("/", 1)[-1].split(".")[0]
    summary = optimize_records(
        model, tok, records, args.out, dataset=tag, modes=args.mode, variants=args.variant,
        explanation=args.explanation, n_trials=args.trials, storage=args.storage, lam=args.lam,
        ppl_cap=args.ppl_cap, max_new_tokens=args.max_new_tokens, batch_size=args.batch, blend=args.blend,
        gating=args.gating, seed=args.seed, only_failed=not args.all_prompts, worker=args.worker,
        fail_running=args.fail_running, heartbeat_interval=args.heartbeat or None,
        progress=not args.no_progress, repetition_guard=not args.no_repetition_guard)
    n_opt = sum(1 for r in summary["records"] if r["runs"])
    n_skip = sum(1 for r in summary["records"] if r.get("skipped"))
    print(f"optimized {n_opt} prompt(s), skipped {n_skip} where the baseline is already accurate; "
          f"plans in {args.out}/plans, studies in {summary['storage']}")
    k, n = summary["kept_unsteered"]
    if k:
        print(f"{k} of {n} search(es) kept no steering: no trial beat the unsteered answer on the objective "
              f"(more --trials may find one)")
    for r in summary["records"]:
        for run in r["runs"]:
            print(json.dumps({"id": r["id"], **run}, ensure_ascii=False))
    return 0


def run_eval(args):
    from ..evaluate.grading import HFJudge, RuleJudge
    from ..evaluate.tasks import load_dataset
    from ..methods.fusion import evaluate_run, write_report

    records = load_dataset(args.dataset) if args.dataset else None
    model, tok = _load(args)
    judge = RuleJudge() if args.judge == "rule" else HFJudge(args.judge)
    report = evaluate_run(model, tok, args.plans, records=records, judge=judge, average=not args.no_average,
                          progress=not args.no_progress)
    paths = write_report(report, args.out)
    s = report["summary_failed"]
    for arm in report["arms"]:
        if s.get(arm, {}).get("n"):
            print(f"{arm:32s} accuracy {s[arm]['accuracy']:.3f} ({s[arm]['accurate']}/{s[arm]['n']})  "
                  f"SimpleQA correct {s[arm]['simpleqa']['CORRECT']}")
    print("wrote " + ", ".join(paths.values()))
    return 0
