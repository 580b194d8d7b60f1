"""A dataset: optimize every record, then evaluate the runs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

from ...evaluate.grading import Grade, RuleJudge, extract_answer, grade, summarize
from ...runtime.attach import attach
from ...runtime.plan import ModelSpec, SteeringPlan
from .files import read_json, safe_id, write_json
from .plans import average_params, fusion_plan
from .prompts import (
    BLENDS,
    DEFAULT_LAMBDA,
    DEFAULT_PPL_CAP,
    FUSION_GATINGS,
    MODES,
    VARIANTS,
    FusionError,
    question_prompt,
    truth_of,
    truths_of,
)
from .references import Reference, compute_reference, explanation_for
from .report import _comparisons
from .runner import PromptRunner
from .search import optimize_prompt
from .study import _safe_url, make_storage, study_name

log = logging.getLogger("fusesteer")


def baseline_record(model, tokenizer, record, max_new_tokens, judge, cache_file: Path | None, fp: str) -> dict:
    if cache_file is not None:
        old = read_json(cache_file)
        if old and old.get("max_new_tokens") == max_new_tokens and old.get("model") == fp:
            return old
    runner = PromptRunner(model, tokenizer, question_prompt(record["question"]), max_new_tokens)
    ans = extract_answer(runner.decode(runner.generate([None])[0]))
    g = grade(record["question"], ans, truths_of(record), judge)
    out = {"id": record["id"], "question": record["question"], "truths": truths_of(record), "answer": ans,
           "grade": g.to_dict(), "max_new_tokens": max_new_tokens, "model": fp}
    if cache_file is not None:
        write_json(cache_file, out)
    return out


def _reference_for(model, tokenizer, record, variant, explanation, explain_tokens, ref_file: Path) -> Reference:
    if ref_file.is_file():
        try:
            ref = Reference.load(ref_file)
            if (ref.question == record["question"].strip() and ref.truth == truth_of(record)
                    and ref.meta.get("requested") == [variant, explanation]
                    and ref.meta.get("model") == ModelSpec.from_model(model).fingerprint()):
                return ref
        except FusionError:
            pass
    expl, src = (None, None)
    if variant == "explanation":
        expl, src = explanation_for(record, explanation, model, tokenizer, explain_tokens)
        if not expl:
            log.warning("record %s: empty explanation; the reference is answer-only", record["id"])
    ref = compute_reference(model, tokenizer, record["question"], truth_of(record), expl, explanation_source=src)
    ref.meta.update({"requested": [variant, explanation], "model": ModelSpec.from_model(model).fingerprint()})
    ref.save(ref_file)
    return ref


def optimize_records(model, tokenizer, records: Sequence[Mapping], out_dir, *, dataset: str = "dataset",
                     modes: Sequence[str] = ("full", "segmented"), variants: Sequence[str] = ("explanation",),
                     explanation: str = "auto", explain_max_new_tokens: int = 48, n_trials: int = 16,
                     storage=None, lam: float = DEFAULT_LAMBDA, ppl_cap: float = DEFAULT_PPL_CAP,
                     max_new_tokens: int = 24, batch_size: int = 4, blend: str = "paper", gating: str = "all",
                     seed: int = 0, only_failed: bool = True, judge=None, worker: int = 0,
                     fail_running: bool = False, heartbeat_interval: int | None = 10,
                     grace_period: int | None = None, progress: bool = True, repetition_guard: bool = True,
                     backend: str = "torch") -> dict:
    """Baseline → (baseline-failed) → reference → per-prompt study for each mode/variant → plan files.

    A prompt whose best trial does not beat no steering on the objective keeps no steering (an empty plan,
    ``"kept": "unsteered"`` in its result; see :func:`~fusesteer.methods.fusion.search.optimize_prompt`);
    ``summary["kept_unsteered"]`` counts those runs.

    Layout of ``out_dir``: ``baseline/<id>.json``, ``refs/<id>.<variant>.safetensors``,
    ``plans/<id>.<mode>.<variant>.safetensors``, ``results/<id>.<mode>.<variant>.json`` and, with the
    default storage, ``studies.db``. Every file is written atomically and only for its own record, so several
    workers may run this on the same records and storage. Returns a summary dict.
    """
    for m in modes:
        if m not in MODES:
            raise FusionError(f"unknown mode {m!r}; expected one of {', '.join(MODES)}")
    for v in variants:
        if v not in VARIANTS:
            raise FusionError(f"unknown variant {v!r}; expected one of {', '.join(VARIANTS)}")
    if blend not in BLENDS:
        raise FusionError(f"unknown blend {blend!r}; expected one of {', '.join(BLENDS)}")
    if gating not in FUSION_GATINGS:
        raise FusionError(f"gating must be one of {', '.join(FUSION_GATINGS)}, got {gating!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if storage is None:
        storage = "sqlite:///" + str((out / "studies.db").resolve())
    st = make_storage(storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    judge = judge or RuleJudge()
    fp = ModelSpec.from_model(model).fingerprint()
    summary = {"dataset": dataset, "out": str(out), "storage": _safe_url(storage), "records": []}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(records), desc="fusion prompts", unit="prompt", position=0)
    try:
        for rec in records:
            rid = str(rec["id"])
            sid = safe_id(rid)
            base = baseline_record(model, tokenizer, rec, max_new_tokens, judge, out / "baseline" / f"{sid}.json", fp)
            entry = {"id": rid, "baseline_accurate": base["grade"]["accurate"], "runs": []}
            if only_failed and base["grade"]["accurate"]:
                entry["skipped"] = "baseline accurate"
                summary["records"].append(entry)
                if bar is not None:
                    bar.update(1)
                continue
            for variant in variants:
                ref = _reference_for(model, tokenizer, rec, variant, explanation, explain_max_new_tokens,
                                     out / "refs" / f"{sid}.{variant}.safetensors")
                for mode in modes:
                    name = study_name(dataset, rid, mode, variant, blend, gating)
                    res = optimize_prompt(model, tokenizer, ref, truths_of(rec), n_trials=n_trials, mode=mode,
                                          blend=blend, gating=gating, lam=lam, ppl_cap=ppl_cap,
                                          max_new_tokens=max_new_tokens, batch_size=batch_size, storage=st,
                                          name=name, seed=seed, worker=worker, fail_running=fail_running,
                                          progress=progress, position=1, repetition_guard=repetition_guard,
                                          backend=backend)
                    plan = res.pop("plan")
                    plan.metadata.update({"record_id": rid, "dataset": dataset})
                    pfile = out / "plans" / f"{sid}.{mode}.{variant}.safetensors"
                    pfile.parent.mkdir(parents=True, exist_ok=True)
                    plan.save(pfile)
                    kept_attrs = res["best_attrs"] if res["kept"] == "steered" else res["unsteered_attrs"]
                    ans = kept_attrs.get("answer", "")
                    res["kept_answer"] = ans
                    g = grade(rec["question"], ans, truths_of(rec), judge)
                    result = {"id": rid, "question": rec["question"], "truths": truths_of(rec), "mode": mode,
                              "variant": variant, "blend": blend, "gating": gating, "lam": lam, "ppl_cap": ppl_cap,
                              "repetition_guard": repetition_guard,
                              "max_new_tokens": max_new_tokens, "n_trials": n_trials, "model": fp,
                              "explanation": ref.explanation, "explanation_source": ref.explanation_source,
                              "plan": str(pfile.relative_to(out)),
                              "reference": str((out / "refs" / f"{sid}.{variant}.safetensors").relative_to(out)),
                              "grade": g.to_dict(), **res}
                    write_json(out / "results" / f"{sid}.{mode}.{variant}.json", result)
                    entry["runs"].append({"mode": mode, "variant": variant, "best_value": res["best_value"],
                                          "unsteered_value": res["unsteered_value"], "kept": res["kept"],
                                          "accurate": g.accurate, "answer": ans})
            summary["records"].append(entry)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    runs = [r for e in summary["records"] for r in e["runs"]]
    summary["kept_unsteered"] = [sum(r["kept"] == "unsteered" for r in runs), len(runs)]
    return summary


def _arm_name(mode: str, variant: str, avg: bool = False) -> str:
    s = mode
    if variant != "explanation":
        s += f" ({variant}-only)"
    if avg:
        s += " (avg α/γ)"
    return s


def evaluate_run(model, tokenizer, run_dir, *, records: Sequence[Mapping] | None = None, judge=None,
                 average: bool = True, progress: bool = True, backend: str = "torch") -> dict:
    """Regenerate baseline and every optimized plan of ``run_dir`` (from :func:`optimize_records`), grade them,
    and summarise per arm on the prompts where the (regenerated) baseline fails. With ``average`` each
    (mode, variant) also gets a dataset-average arm: the mean best α/γ over the prompts applied to each
    prompt's own Δ. ``records`` (optional) supplies the truths; otherwise those stored in the results are used.
    """
    run = Path(run_dir)
    files = sorted((run / "results").glob("*.json"))
    if not files:
        raise FusionError(f"{run}: no results/*.json; run `fusesteer fusion optimize --out {run}` first")
    results = [r for r in (read_json(f) for f in files) if isinstance(r, dict) and "id" in r]
    by_id: dict[str, list[dict]] = {}
    for r in results:
        by_id.setdefault(r["id"], []).append(r)
    rec_map = {str(r["id"]): r for r in records} if records is not None else {}
    if records is not None:
        missing = [i for i in by_id if i not in rec_map]
        if missing:
            raise FusionError(f"{len(missing)} optimized record(s) are not in the given dataset "
                              f"(e.g. {missing[0]!r}); pass the dataset the plans were optimized on")
    judge = judge or RuleJudge()
    spec = ModelSpec.from_model(model)
    mnt = {r["max_new_tokens"] for r in results}
    if len(mnt) != 1:
        raise FusionError(f"results mix max_new_tokens values {sorted(mnt)}")
    max_new_tokens = mnt.pop()
    avg_params: dict[tuple[str, str], dict] = {}
    if average:
        groups: dict[tuple[str, str], list] = {}
        for r in results:
            groups.setdefault((r["mode"], r["variant"]), []).append(r["best_params"])
        avg_params = {k: average_params(v, k[0]) for k, v in groups.items()}
    items = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(by_id), desc="fusion eval", unit="prompt")
    try:
        for rid, rs in by_id.items():
            rec = rec_map.get(rid)
            question = rec["question"] if rec else rs[0]["question"]
            truths = truths_of(rec) if rec else rs[0]["truths"]
            plans: dict[str, SteeringPlan] = {}
            for r in sorted(rs, key=lambda r: (r["variant"] != "explanation", r["mode"])):
                plans[_arm_name(r["mode"], r["variant"])] = SteeringPlan.load(run / r["plan"])
                if average:
                    ref = Reference.load(run / r["reference"])
                    plans[_arm_name(r["mode"], r["variant"], True)] = fusion_plan(
                        ref, spec, avg_params[(r["mode"], r["variant"])], r["mode"], r["blend"], r["gating"])
            runner = PromptRunner(model, tokenizer, question_prompt(question), max_new_tokens)
            with attach(model, plans, backend=backend, check_finite=False) as h:
                rows = [None] + list(plans)
                gen = runner.generate(rows, h)
            item = {"id": rid, "question": question, "truths": truths, "arms": {},
                    "optimizer_answers": {_arm_name(r["mode"], r["variant"]):
                                          r.get("kept_answer", r["best_attrs"].get("answer")) for r in rs}}
            for name, toks in zip(["baseline"] + list(plans), gen):
                ans = extract_answer(runner.decode(toks))
                item["arms"][name] = grade(question, ans, truths, judge).to_dict()
            items.append(item)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    arms = ["baseline"]
    for it in items:
        for a in it["arms"]:
            if a not in arms:
                arms.append(a)
    failed = [it for it in items if not it["arms"]["baseline"]["accurate"]]

    def summ(subset):
        out = {}
        for a in arms:
            gs = [Grade(**it["arms"][a]) for it in subset if a in it["arms"]]
            out[a] = summarize(gs)
        return out

    comparisons = _comparisons(failed, arms)
    consistent = sum(it["arms"][a]["answer"] == (it["optimizer_answers"].get(a) or "")
                     for it in items for a in it["optimizer_answers"] if a in it["arms"])
    total_opt = sum(1 for it in items for a in it["optimizer_answers"] if a in it["arms"])
    kept_unsteered: dict[str, list[int]] = {}
    for r in results:
        k = kept_unsteered.setdefault(_arm_name(r["mode"], r["variant"]), [0, 0])
        k[0] += r.get("kept") == "unsteered"
        k[1] += 1
    return {
        "run": str(run), "n_prompts": len(items), "n_baseline_failed": len(failed),
        "kept_unsteered": kept_unsteered,
        "max_new_tokens": max_new_tokens, "judge": getattr(judge, "name", type(judge).__name__),
        "average_params": {f"{m}/{v}": p for (m, v), p in avg_params.items()},
        "arms": arms, "summary_failed": summ(failed), "summary_all": summ(items), "comparisons": comparisons,
        "optimizer_answer_reproduced": [consistent, total_opt], "items": items,
    }
