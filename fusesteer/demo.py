"""`fusesteer demo`: steer the embedded default model end to end in about a minute on a laptop CPU.

1. load SmolLM2-135M-Instruct (converted once from the PyPI wheel's GGUF, cached),
2. build a CAA plan from a handful of contrastive pairs (strategyqa questions answered "Yes" vs "No":
   a yes-bias direction, vendored data, see fusesteer/data/README.md),
3. generate a few prompts unsteered and steered side by side,
4. report torch-vs-reference parity (max logit difference, token agreement) and the steered/vanilla
   decode-step time ratio (interleaved, median of paired ratios).
"""

from __future__ import annotations

import json
import textwrap
import time

import torch

from . import models
from .evaluate.tasks import load_dataset
from .methods.caa import caa_plan
from .runtime.attach import attach
from .timing import median_ratio_ci, paired_decode_steps


def _chat(tok, q: str) -> str:
    msgs = [{"role": "user", "content": f"{q} Answer yes or no, then explain briefly."}]
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return f"Question: {q}\nAnswer:"


def run_demo(model_name: str = "smollm2-135m", n_pairs: int = 16, layers=None, scale: float = 0.5,
             max_new_tokens: int = 32, backend: str = "auto", cycles: int = 40, out_json: str | None = None,
             threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, tok = models.load(model_name)
    load_s = time.perf_counter() - t0
    n_layers = model.config.num_hidden_layers
    layers = list(layers) if layers else [round(0.4 * n_layers)]

    records = load_dataset("strategyqa")
    train, show = records[:n_pairs], records[n_pairs:n_pairs + 4]
    pos = [f"Question: {r['question']}\nAnswer: Yes" for r in train]
    neg = [f"Question: {r['question']}\nAnswer: No" for r in train]
    t1 = time.perf_counter()
    plan = caa_plan(model, tok, pos, neg, layers=layers, scale=scale, name="yes-bias (demo)",
                    provenance={"dataset": "strategyqa.dev.jsonl", "records": [r["id"] for r in train]})
    build_s = time.perf_counter() - t1
    print(f"model {model_name}: {n_layers} layers, loaded in {load_s:.1f}s; plan: CAA over {n_pairs} pairs at "
          f"layers {layers}, scale {scale} (built in {build_s:.1f}s)\n")

    tok.padding_side = "left"
    prompts = [_chat(tok, r["question"]) for r in show]
    enc = tok(prompts, return_tensors="pt", padding=True)
    gen_kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)

    def decode(out):
        return [tok.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for o in out]

    with torch.inference_mode():
        vanilla = decode(model.generate(**enc, **gen_kw))
        with attach(model, plan, backend=backend):
            steered_ids = model.generate(**enc, **gen_kw)
            logits_fast = model(**enc).logits
        with attach(model, plan, backend="reference"):
            ref_ids = model.generate(**enc, **gen_kw)
            logits_ref = model(**enc).logits
    steered = decode(steered_ids)
    for r, v, s in zip(show, vanilla, steered):
        print(f"Q: {r['question']}  (truth: {r['answer']})")
        print(textwrap.indent(textwrap.fill("unsteered: " + v.replace("\n", " "), 100), "  "))
        print(textwrap.indent(textwrap.fill("steered:   " + s.replace("\n", " "), 100), "  "))
        print()
    gen_len = steered_ids.shape[1] - enc["input_ids"].shape[1]
    agree = (steered_ids[:, -gen_len:] == ref_ids[:, -gen_len:]).float().mean().item()
    max_diff = (logits_fast.float() - logits_ref.float()).abs().max().item()
    print(f"parity {backend} vs reference: max |Δlogit| = {max_diff:.2e}, greedy token agreement = {agree:.1%}")

    ids1 = enc["input_ids"][:1, -16:]
    res = paired_decode_steps(model, ids1, {"vanilla": None, "vanilla-2": None,
                                            "steered": lambda: attach(model, plan, backend=backend,
                                                                      check_finite=False)},
                              cycles=cycles, warmup=5)
    van = res["vanilla"].times_ms
    summ = median_ratio_ci(res["steered"].times_ms, van)
    ctrl = median_ratio_ci(res["vanilla-2"].times_ms, van)
    # one statistic throughout: medians over the same interleaved steps, and the ratio of those medians
    print(f"decode step (batch 1, medians of {cycles} interleaved steps): vanilla {summ['den_ms']:.1f} ms, "
          f"steered {summ['num_ms']:.1f} ms; steered/vanilla = {summ['ratio']:.3f} (95% CI {summ['ci_low']:.3f}-"
          f"{summ['ci_high']:.3f}); A/A control vanilla/vanilla = {ctrl['ratio']:.3f} (95% CI "
          f"{ctrl['ci_low']:.3f}-{ctrl['ci_high']:.3f})")
    report = {
        "model": model_name, "layers": layers, "scale": scale, "backend": backend,
        "samples": [{"question": r["question"], "truth": r["answer"], "unsteered": v, "steered": s}
                    for r, v, s in zip(show, vanilla, steered)],
        "parity": {"max_abs_logit_diff": max_diff, "token_agreement": agree},
        "timing": {"vanilla_ms": summ["den_ms"], "steered_ms": summ["num_ms"], "ratio": summ["ratio"],
                   "ratio_ci": [summ["ci_low"], summ["ci_high"]], "control_ratio": ctrl["ratio"],
                   "control_ci": [ctrl["ci_low"], ctrl["ci_high"]]},
    }
    if out_json:
        with open(out_json, "w") as f:
            json.dump(report, f, indent=2)
    return report
