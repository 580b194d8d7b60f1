"""The evaluation report: comparisons, Markdown and PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from .files import write_json


def _comparisons(items: Sequence[Mapping], arms: Sequence[str]) -> list[dict]:
    """Paired accuracy differences (bootstrap 95% CI, exact McNemar p) on the same prompts: every arm vs the
    baseline, segmented vs full, and each per-prompt arm vs its answer-only and dataset-average ablations."""
    from ...evaluate.stats import mcnemar_p, paired_bootstrap_diff

    pairs = [(a, "baseline") for a in arms if a != "baseline"]
    if "segmented" in arms and "full" in arms:
        pairs.append(("segmented", "full"))
    for a in arms:
        for b in arms:
            if a != b and a != "baseline" and b.startswith(a + " ("):
                pairs.append((a, b))
    out = []
    for a, b in pairs:
        rows = [it for it in items if a in it["arms"] and b in it["arms"]]
        if not rows:
            continue
        ca = [bool(it["arms"][a]["accurate"]) for it in rows]
        cb = [bool(it["arms"][b]["accurate"]) for it in rows]
        d = paired_bootstrap_diff(ca, cb, n_boot=2000, seed=0)
        out.append({"a": a, "b": b, "n": len(rows), "diff": d.estimate, "ci": [d.low, d.high],
                    "mcnemar_p": mcnemar_p(ca, cb),
                    "a_only": sum(x and not y for x, y in zip(ca, cb)),
                    "b_only": sum(y and not x for x, y in zip(ca, cb))})
    return out


def write_report(report: Mapping, out_dir, stem: str = "fusion_eval", title: str = "Fusion Steering evaluation",
                 notes: Sequence[str] = ()) -> dict[str, str]:
    """Write ``{stem}.json``, ``{stem}.md`` (table) and ``{stem}.png`` (accuracy by arm); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / f"{stem}.json"), "md": str(out / f"{stem}.md"), "png": str(out / f"{stem}.png")}
    write_json(Path(paths["json"]), report)
    summ = report["summary_failed"]
    arms = [a for a in report["arms"] if summ.get(a, {}).get("n")]
    lines = [f"# {title}", "",
             f"Prompts evaluated: {report['n_prompts']}; baseline failed (composite < 0.6) on "
             f"{report['n_baseline_failed']}; the table is on those. Judge: {report['judge']}; greedy decoding, "
             f"max_new_tokens={report['max_new_tokens']}.", "",
             "| arm | n | accurate | accuracy | 95% CI (Wilson) | mean composite | mean overlap | "
             "SimpleQA correct | incorrect | not attempted |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for a in arms:
        s = summ[a]
        lo, hi = s["accuracy_ci"]
        c = s["simpleqa"]
        lines.append(f"| {a} | {s['n']} | {s['accurate']} | {s['accuracy']:.3f} | [{lo:.3f}, {hi:.3f}] | "
                     f"{s['mean_composite']:.3f} | {s['mean_overlap']:.3f} | {c['CORRECT']} | {c['INCORRECT']} | "
                     f"{c['NOT_ATTEMPTED']} |")
    comps = report.get("comparisons") or []
    if comps:
        lines += ["", "Paired differences in accuracy on the same prompts (A − B; paired bootstrap 95% CI; exact "
                      "McNemar p; prompts only A / only B gets right):", "",
                  "| A | B | n | A − B | 95% CI | McNemar p | only A | only B |",
                  "|---|---|---:|---:|---|---:|---:|---:|"]
        for c in comps:
            lines.append(f"| {c['a']} | {c['b']} | {c['n']} | {c['diff']:+.3f} | "
                         f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] | "
                         f"{c['mcnemar_p']:.3g} | {c['a_only']} | {c['b_only']} |")
    if report.get("average_params"):
        lines += ["", "Dataset-average α/γ: " + "; ".join(
            f"{k}: " + ", ".join(f"{p}={v:.3f}" for p, v in ps.items()) for k, ps in report["average_params"].items())]
    kept = report.get("kept_unsteered")
    if kept:
        lines += ["", "Prompts whose search kept no steering (no trial beat the unsteered answer on the objective; "
                      "their arm answers unsteered): " + "; ".join(f"{a}: {k}/{n}" for a, (k, n) in kept.items())]
    rep = report.get("optimizer_answer_reproduced")
    if rep:
        lines += ["", f"Optimizer's best answers reproduced by the evaluation run: {rep[0]}/{rep[1]} "
                      f"(batched decoding may flip near-tied greedy tokens)."]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    Path(paths["md"]).write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        acc = [summ[a]["accuracy"] for a in arms]
        err = [[summ[a]["accuracy"] - summ[a]["accuracy_ci"][0] for a in arms],
               [summ[a]["accuracy_ci"][1] - summ[a]["accuracy"] for a in arms]]
        axes[0].bar(range(len(arms)), acc, yerr=err, capsize=4, color="#4C72B0")
        axes[0].set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
        axes[0].set_ylabel("accuracy (composite ≥ 0.6)")
        axes[0].set_ylim(0, 1)
        axes[0].set_title(f"baseline-failed prompts (n={report['n_baseline_failed']}), 95% Wilson CI", fontsize=9)
        bottom = [0.0] * len(arms)
        for g, col in (("CORRECT", "#55A868"), ("INCORRECT", "#C44E52"), ("NOT_ATTEMPTED", "#8C8C8C")):
            vals = [summ[a]["simpleqa_rate"][g] for a in arms]
            axes[1].bar(range(len(arms)), vals, bottom=bottom, color=col, label=g)
            bottom = [b + v for b, v in zip(bottom, vals)]
        axes[1].set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
        axes[1].set_ylabel("share of prompts")
        axes[1].set_title("SimpleQA-style grade", fontsize=9)
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(paths["png"], dpi=110)
        plt.close(fig)
    except ImportError:  # pragma: no cover
        paths.pop("png")
    return paths
