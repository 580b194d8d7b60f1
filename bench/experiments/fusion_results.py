"""Fusion Steering on SmolLM2-135M-Instruct with FreshQA (SimpleQA-like factual QA): the paper's protocol.

1. Baseline: greedy answers (``"Question: {q}\\nAnswer:"``, max_new_tokens 24) for ``--n`` FreshQA dev prompts
   drawn with ``tasks.split(records, n, 0, seed)``; graded with the rule judge (composite ≥ 0.6 = accurate).
2. The prompts where the baseline fails (at most ``--max-failed``) get a model-written explanation of their
   ground truth, reference activations, and a per-prompt Optuna search (``--trials`` COMPLETE trials, TPE,
   seed 0) for each arm: full-layer and segmented with answer+explanation references, and segmented with
   answer-only references (the paper's first ablation).
3. Evaluation regenerates baseline and every best plan, plus the dataset-average α/γ arms (the paper's
   "static vs per-prompt" ablation: the mean best α/γ applied to each prompt's own Δ), grades all and reports
   on the baseline-failed prompts with Wilson CIs and paired tests.
4. bitsandbytes 8-bit check: the model loaded with ``quantization="8bit"`` runs baseline + the best segmented
   plans of the first ``--quant-check`` prompts end to end; answers are compared with fp32.

The truth is used to build Δ and to choose α/γ (as in the paper): the accuracy gains are *oracle* steering,
not a deployable QA improvement. Writes bench/results/fusion_results.{json,md,png}; plans, references and the
Optuna SQLite file go to ``--run-dir``.

    python bench/experiments/fusion_results.py [--n 48] [--max-failed 28] [--trials 12] [--threads 1]
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
from fusesteer.evaluate import tasks  # noqa: E402
from fusesteer.evaluate.grading import RuleJudge, extract_answer, grade  # noqa: E402
from fusesteer.methods import fusion as F  # noqa: E402
from fusesteer.methods.fusion.files import safe_id  # noqa: E402
from fusesteer.methods.fusion.pipeline import baseline_record  # noqa: E402
from fusesteer.runtime.plan import ModelSpec, SteeringPlan  # noqa: E402

OUT = ROOT / "bench" / "results"


def _notes(report: dict) -> list[str]:
    c, base, q, tm = report["config"], report["baseline_all"], report.get("quant_8bit"), report["timings"]
    n = report["n_baseline_failed"]
    min_p = min((x["mcnemar_p"] for x in report.get("comparisons", [])), default=1.0)
    near = sum(1 for it in report["items"] for a, g in it["arms"].items()
               if a != "baseline" and g["simpleqa"] == "CORRECT" and not g["accurate"])
    notes = [
        f"Model {c['model']} (fp32 weights dequantized from the bundled GGUF), {c['dataset']} dev, "
        f"{c['n_prompts_baseline']} prompts sampled with seed {c['seed']}; the baseline was accurate on "
        f"{base['accurate']} of them (SimpleQA C/I/NA {base['simpleqa']['CORRECT']}/{base['simpleqa']['INCORRECT']}/"
        f"{base['simpleqa']['NOT_ATTEMPTED']}); {report['n_optimized']} baseline-failed prompts were optimized "
        f"({c['trials_per_prompt_and_arm']} COMPLETE Optuna trials per prompt and arm, TPE, batches of {c['batch']}).",
        "Objective: token F1 with the truth − 0.3·max(min(1, NLL/ln 1000), repetition), NLL of the generated "
        "tokens under the unsteered model, repetition = 1 − distinct/total token bigrams (our guard against loops "
        "the unsteered model finds likely). α ~ U[0, 1], γ ~ log-U[0.01, 1]. Plans: paper blend (a = 1, "
        "b = α·γ·Δ_l) at layer.out of every layer, gating 'all'; explanations written by the model itself.",
        "Oracle caveat: the ground truth builds Δ and selects α/γ per prompt (as in the paper), so these are "
        "upper-bound style numbers on the optimized prompts, not a held-out QA improvement.",
        "Judge: the deterministic rule judge (lexical proxy; no negation/paraphrase understanding). Right but "
        "wordy answers to yes/no or long-sentence references can stay below 0.6 because the F1 half of the composite "
        f"punishes length: {near} steered answer(s) here are SimpleQA CORRECT with composite < 0.6.",
        "The baseline row is 0 by construction (prompts were selected where it fails); the regenerated baseline "
        "reproduces that selection. Dataset-average arms use the arithmetic mean of the per-prompt best α and γ "
        "(the paper's static-parameter ablation) applied to each prompt's own Δ.",
        f"With {n} prompts one success is {100 / max(n, 1):.1f}%; the smallest exact McNemar p among the paired "
        f"comparisons is {min_p:.3g}.",
    ]
    if q:
        notes.append(f"8-bit (bitsandbytes LLM.int8 on CPU, {q['linear8bit_modules']} Linear8bitLt modules): baseline "
                     f"+ best segmented plans ran end to end on {q['prompts']} prompts; answers equal to fp32 on "
                     f"{q['baseline_same_as_fp32']}/{q['prompts']} (baseline) and {q['segmented_same_as_fp32']}/"
                     f"{q['prompts']} (segmented; plans optimized in fp32); segmented accurate "
                     f"{q['segmented_accurate_8bit']} (8-bit) vs {q['segmented_accurate_fp32']} (fp32).")
    notes.append("Wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in tm.items())
                 + f" ({c['threads']} torch thread(s), "
                 "shared 2-core CPU).")
    return notes


TITLE = "Fusion Steering — SmolLM2-135M-Instruct, FreshQA (baseline-failed prompts)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="freshqa")
    ap.add_argument("--n", type=int, default=48, help="prompts given to the baseline")
    ap.add_argument("--max-failed", type=int, default=28, help="baseline-failed prompts optimized")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--batch", type=int, default=6, help="trials decoded together")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared, oversubscribed 2-core box OpenMP spinning made 2 threads "
                         "~18x slower per decode step)")
    ap.add_argument("--no-answer-only", action="store_true", help="skip the answer-only ablation")
    ap.add_argument("--quant-check", type=int, default=6, help="prompts re-run with the 8-bit model (0: skip)")
    ap.add_argument("--run-dir", default="/tmp/fusesteer_fusion_run")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite fusion_results.{md,png} from the existing fusion_results.json")
    args = ap.parse_args(argv)
    if args.render_only:
        report = json.loads((Path(args.out) / "fusion_results.json").read_text())
        paths = F.write_report(report, args.out, stem="fusion_results", title=TITLE, notes=_notes(report))
        print("wrote " + ", ".join(paths.values()))
        return 0
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    timings = {}
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    judge = RuleJudge()

    t0 = time.perf_counter()
    model, tok = models.load(args.model)
    timings["load_s"] = time.perf_counter() - t0
    records, _ = tasks.split(tasks.load_dataset(args.dataset), args.n, 0, seed=args.seed)
    fp = ModelSpec.from_model(model).fingerprint()

    # 1. baseline on all n prompts (cached in the run dir, shared with optimize_records)
    t0 = time.perf_counter()
    base = {}
    for r in records:
        base[r["id"]] = baseline_record(model, tok, r, args.max_new_tokens, judge,
                                    run / "baseline" / f"{safe_id(r['id'])}.json", fp)
    timings["baseline_s"] = time.perf_counter() - t0
    failed = [r for r in records if not base[r["id"]]["grade"]["accurate"]]
    chosen = failed[:args.max_failed]
    print(f"baseline accurate on {len(records) - len(failed)}/{len(records)}; optimizing {len(chosen)} failed "
          f"prompts", flush=True)

    # 2. per-prompt search
    common = dict(dataset=args.dataset, n_trials=args.trials, max_new_tokens=args.max_new_tokens,
                  batch_size=args.batch, seed=args.seed, judge=judge, explanation="auto")
    t0 = time.perf_counter()
    F.optimize_records(model, tok, chosen, run, modes=("full", "segmented"), variants=("explanation",), **common)
    timings["optimize_explanation_s"] = time.perf_counter() - t0
    if not args.no_answer_only:
        t0 = time.perf_counter()
        F.optimize_records(model, tok, chosen, run, modes=("segmented",), variants=("answer",), **common)
        timings["optimize_answer_only_s"] = time.perf_counter() - t0

    # 3. evaluation
    t0 = time.perf_counter()
    report = F.evaluate_run(model, tok, run, records=chosen, judge=judge)
    timings["eval_s"] = time.perf_counter() - t0

    # 4. 8-bit end to end
    quant = None
    if args.quant_check > 0:
        t0 = time.perf_counter()
        del model
        m8, tok8 = models.load(args.model, quantization="8bit")
        n8 = sum(type(m).__name__ == "Linear8bitLt" for m in m8.modules())
        rows = []
        for it in report["items"][:args.quant_check]:
            sid = safe_id(it["id"])
            plan = SteeringPlan.load(run / "plans" / f"{sid}.segmented.explanation.safetensors")
            runner = F.PromptRunner(m8, tok8, F.question_prompt(it["question"]), args.max_new_tokens)
            with attach(m8, {"segmented": plan}, backend="torch", check_finite=False) as h:
                gen = runner.generate([None, "segmented"], h)
            a_base, a_seg = (extract_answer(runner.decode(g)) for g in gen)
            g8 = grade(it["question"], a_seg, it["truths"], judge)
            rows.append({"id": it["id"], "baseline_8bit": a_base, "segmented_8bit": a_seg,
                         "baseline_fp32": it["arms"]["baseline"]["answer"],
                         "segmented_fp32": it["arms"]["segmented"]["answer"],
                         "segmented_8bit_accurate": g8.accurate, "segmented_fp32_accurate":
                             it["arms"]["segmented"]["accurate"]})
        quant = {"linear8bit_modules": n8, "prompts": len(rows),
                 "baseline_same_as_fp32": sum(r["baseline_8bit"] == r["baseline_fp32"] for r in rows),
                 "segmented_same_as_fp32": sum(r["segmented_8bit"] == r["segmented_fp32"] for r in rows),
                 "segmented_accurate_8bit": sum(r["segmented_8bit_accurate"] for r in rows),
                 "segmented_accurate_fp32": sum(r["segmented_fp32_accurate"] for r in rows),
                 "rows": rows, "seconds": time.perf_counter() - t0}
    timings["total_s"] = time.perf_counter() - t_start

    base_all = sum(b["grade"]["accurate"] for b in base.values())
    report.update({
        "config": {"model": args.model, "dataset": args.dataset, "n_prompts_baseline": len(records),
                   "seed": args.seed, "trials_per_prompt_and_arm": args.trials, "batch": args.batch,
                   "max_new_tokens": args.max_new_tokens, "lam": F.DEFAULT_LAMBDA, "ppl_cap": F.DEFAULT_PPL_CAP,
                   "blend": "paper", "gating": "all", "threads": args.threads, "dtype": "float32",
                   "explanations": "model-generated (FreshQA has none)", "judge": "rule"},
        "baseline_all": {"n": len(records), "accurate": base_all,
                         "simpleqa": {g: sum(b["grade"]["simpleqa"] == g for b in base.values())
                                      for g in ("CORRECT", "INCORRECT", "NOT_ATTEMPTED")}},
        "n_optimized": len(chosen), "quant_8bit": quant, "timings": timings,
    })
    paths = F.write_report(report, args.out, stem="fusion_results", title=TITLE, notes=_notes(report))
    s = report["summary_failed"]
    for arm in report["arms"]:
        if s.get(arm, {}).get("n"):
            print(f"{arm:36s} accuracy {s[arm]['accuracy']:.3f} ({s[arm]['accurate']}/{s[arm]['n']})  "
                  f"SimpleQA C/I/NA {s[arm]['simpleqa']['CORRECT']}/{s[arm]['simpleqa']['INCORRECT']}/"
                  f"{s[arm]['simpleqa']['NOT_ATTEMPTED']}", flush=True)
    print("wrote " + ", ".join(paths.values()))
    print(json.dumps(timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
