"""Fusion Steering (arXiv 2505.22572) as a plan builder on the fusesteer runtime.

Per prompt (question q with ground truth t):

1. **Explanation** — the model explains (q, t), greedy and bounded (:func:`generate_explanation`);
   StrategyQA-style records carry one already (``explanation="auto"`` uses the record's, else generates).
2. **Reference** (:func:`compute_reference`) — the enriched text
   ``"Question: {q}\\nAnswer and Explanation: {t} {explanation}"`` is run once; h_l is the mean
   ``layer.out`` activation over the tokens of ``" {t} {explanation}"`` (the exact span: the common prefix
   of the token ids of the prefix alone and of the full text is the prompt part, so a token merging the
   prefix's end with the target's start counts as target; trailing special tokens are dropped).
   μ_l is the mean over the tokens of the question-only prompt ``"Question: {q}\\nAnswer:"`` (the prompt
   the model answers), leading/trailing special tokens (BOS) excluded — the BOS position is an attention
   sink whose huge norm would otherwise dominate the mean. Δ_l = h_l − μ_l for every layer l. The
   *answer-only* variant (the paper's first ablation) drops the explanation.
3. **Plans** (:func:`fusion_plan`) at ``layer.out`` of every layer:

   * paper blend (default): fused = (1−α)·x + α·(x + γΔ_l)  ⇒  a = 1, b = α·γ·Δ_l;
   * interpolated patching (``blend="interp"``): (1−α)·(x + γΔ_l) + α·h_l  ⇒  a = 1−α,
     b = (1−α)·γ·Δ_l + α·h_l.

   ``mode="full"``: one (α, γ) for all layers. ``mode="segmented"``: early / middle / late thirds
   (:func:`segment_bounds`: sizes ⌊L/3⌋, the first L mod 3 segments one layer longer — 26 layers give
   9/9/8), each with its own (α, γ).
   Gating default ``"all"``: the paper's hooks fire on every forward, prompt prefill included. With
   ``gating="generated"`` the prompt's KV cache is computed once, unsteered, and reused by every trial;
   the steering then starts at the *last prompt token* (whose forward predicts the first answer token),
   so the first answer token is steered too. Under ``"all"`` the steered prefill differs per trial and
   cannot be reused; the unsteered prefix is still reused for the perplexity pass.
4. **Per-prompt search** (:class:`PromptSearch`, :func:`run_study`): Optuna TPE (fixed seed,
   multivariate, constant liar) over α ∈ [0, 1] (uniform) and γ ∈ [0.01, 1] (log-uniform: γ is a scale,
   and the per-layer shifts add up along the residual stream, so useful values sit near the low end)
   per segment, maximising::

       score = overlap(answer, truths) − λ · max(min(1, NLL / ln(ppl_cap)), repetition)

   overlap: SQuAD token F1 (:func:`fusesteer.evaluate.grading.token_overlap`) of the extracted answer;
   NLL: mean negative log-likelihood (nats/token) of the generated tokens (EOS excluded, the stopping
   line break included) under the **unsteered** model — the steered model would call its own degenerate
   output fluent — so log-perplexity is normalised by ln(ppl_cap) (default cap 1000, λ = 0.3) and
   clipped to [0, 1]; an empty answer scores 0 − λ. *repetition* (:func:`repetition_rate`, 1 − distinct /
   total token bigrams of the generated tokens) is our guard, on by default (``repetition_guard=False``
   gives the paper-literal objective): an unsteered model copies loops in context, so "ââââ…" or
   "~~~~…" get a low perplexity, and on SmolLM2-135M the literal objective preferred such loops to a fluent
   wrong answer. Trials run ``batch_size`` at a time as rows of one
   batch, each row routed to its own plan on a single attachment whose values change with
   ``handle.update()`` (no re-patching).

Studies live in an Optuna RDB storage (SQLite file by default, any SQLAlchemy URL) under a name derived
from (dataset, record id, mode, variant, blend, gating); the objective's settings are stored in the
study and checked on reload. The loop asks/tells trials itself instead of ``study.optimize``:

* it counts COMPLETE trials and runs only the missing ones (resume);
* a trial runs only if fewer than n live (COMPLETE or RUNNING) trials have a smaller number, else it is
  closed as PRUNED (``user_attrs["surplus"]``) — trial numbers are allotted atomically by the storage,
  so several workers sharing one study finish **exactly** n COMPLETE trials between them (plain
  ``MaxTrialsCallback`` can overshoot by one per extra worker);
* while running trials it records Optuna heartbeats; RUNNING trials left by a killed process go FAIL
  once their heartbeat is older than the grace period (``fail_stale_trials``), and their slot is re-run;
  ``fail_running=True`` fails every RUNNING trial at start (only when no other worker is alive);
* an exception in a trial marks that batch FAIL and propagates; rerunning resumes.

The sampler seed is derived from (seed, study name), so prompts do not share their random start-up
trials. TPE's random state is not stored: a resumed or multi-worker study reseeds its sampler with
``that + 7919·worker + (trials already in the study)``, so only an uninterrupted single-worker run is
exactly reproducible.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import FuseSteerError
from ..evaluate.grading import (Grade, RuleJudge, extract_answer, grade, summarize, token_overlap)
from ..runtime.attach import attach
from ..runtime.compat import output_cache, with_cache
from ..runtime.plan import ModelSpec, SteeringPlan
from .capture import capture_span_mean

log = logging.getLogger("fusesteer")

__all__ = [
    "FusionError", "MODES", "BLENDS", "VARIANTS", "SEGMENTS", "DEFAULT_LAMBDA", "DEFAULT_PPL_CAP",
    "question_prompt", "enriched_parts", "truth_of", "truths_of", "generate_explanation", "explanation_for",
    "token_span", "Reference", "compute_reference", "segment_bounds", "param_space", "layer_params",
    "fusion_plan", "average_params", "PromptRunner", "normalized_perplexity", "repetition_rate", "objective_score",
    "make_storage", "study_name", "run_study", "PromptSearch", "optimize_prompt", "optimize_records",
    "evaluate_run", "write_report",
]


class FusionError(FuseSteerError, ValueError):
    """Bad input to a Fusion Steering function (record, reference, parameters, storage, study)."""


MODES = ("full", "segmented")
BLENDS = ("paper", "interp")
VARIANTS = ("explanation", "answer")
SEGMENTS = ("early", "middle", "late")
FUSION_GATINGS = ("all", "generated")
DEFAULT_LAMBDA = 0.3
DEFAULT_PPL_CAP = 1000.0
ALPHA_RANGE = (0.0, 1.0, False)  # (low, high, log-scale sampling)
GAMMA_RANGE = (0.01, 1.0, True)
EXPLAIN_PROMPT = "Question: {question}\nAnswer: {truth}\nExplanation:"


# --------------------------------------------------------------------------------------------
# Records and prompts
# --------------------------------------------------------------------------------------------
def _clean_question(q) -> str:
    if not isinstance(q, str) or not q.strip():
        raise FusionError(f"question must be a non-empty string, got {q!r:.80}")
    return q.strip()


def question_prompt(question: str) -> str:
    """The question-only prompt the model answers: ``"Question: {q}\\nAnswer:"``."""
    return f"Question: {_clean_question(question)}\nAnswer:"


def enriched_parts(question: str, truth: str, explanation: str | None = None) -> tuple[str, str]:
    """(prefix, target) of the enriched prompt; the reference span covers ``target``."""
    q = _clean_question(question)
    if not isinstance(truth, str) or not truth.strip():
        raise FusionError(f"truth must be a non-empty string, got {truth!r:.80}")
    target = " " + truth.strip()
    if explanation is not None:
        if not isinstance(explanation, str):
            raise FusionError(f"explanation must be a string or None, got {type(explanation).__name__}")
        if explanation.strip():
            target += " " + explanation.strip()
    return f"Question: {q}\nAnswer and Explanation:", target


def truths_of(record: Mapping) -> list[str]:
    """Reference answers of a record: ``answers`` (open), ``[answer]`` (yes/no) or the right choice (mc)."""
    if not isinstance(record, Mapping):
        raise FusionError(f"record must be a dict, got {type(record).__name__}")
    if isinstance(record.get("answers"), list) and record["answers"]:
        out = [a.strip() for a in record["answers"] if isinstance(a, str) and a.strip()]
        if out:
            return out
    if "choices" in record and "answer_index" in record:
        try:
            return [str(record["choices"][int(record["answer_index"])]).strip()]
        except (IndexError, TypeError, ValueError):
            raise FusionError(f"record {record.get('id')!r}: answer_index does not index choices") from None
    if isinstance(record.get("answer"), str) and record["answer"].strip():
        return [record["answer"].strip()]
    raise FusionError(f"record {record.get('id')!r} has no ground truth ('answers', 'answer' or "
                      f"'choices' + 'answer_index')")


def truth_of(record: Mapping) -> str:
    """The ground truth used for the reference (the first reference answer)."""
    return truths_of(record)[0]


def _check_unsteered(model, what: str) -> None:
    if getattr(model, "_fusesteer_handle", None) is not None:
        raise FusionError(f"{what} needs the unsteered model, but a fusesteer plan is attached; detach it first")


def _device(model) -> torch.device:
    try:
        return model.get_input_embeddings().weight.device
    except Exception:  # noqa: BLE001
        return next(model.parameters()).device


def _encode(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def _special_ids(tokenizer) -> set[int]:
    return {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}


# --------------------------------------------------------------------------------------------
# Greedy decoding with prefill reuse
# --------------------------------------------------------------------------------------------
class PromptRunner:
    """Greedy decoding of one prompt under several plans at once (one batch row per plan).

    The prompt is tokenized once. ``prefix`` = its unsteered KV cache over all tokens but the last,
    computed at first use and deep-copied per call (never modified), is reused by unsteered passes and by
    plans gated ``"generated"``; whenever a handle is given, its prompt length is set to ``n − 1`` so
    that generated-gated plans also steer the last prompt token (``"all"``-gated plans are unaffected).
    Decoding stops at EOS, at ``max_new_tokens``, or (``stop_at_newline``) once a line break follows
    non-blank text — the answer is cut there anyway (:func:`~fusesteer.evaluate.grading.extract_answer`).
    """

    def __init__(self, model, tokenizer, prompt: str, max_new_tokens: int = 24, *, stop_at_newline: bool = True,
                 reuse_prefill: bool = True):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise FusionError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not isinstance(prompt, str) or not prompt:
            raise FusionError("prompt must be a non-empty string")
        self.model, self.tokenizer = model, tokenizer
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.stop_at_newline = stop_at_newline
        self.reuse_prefill = reuse_prefill
        self.device = _device(model)
        ids = _encode(tokenizer, prompt)
        if not ids:
            raise FusionError(f"prompt {prompt[:60]!r} tokenizes to no tokens")
        self.ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        self.n = len(ids)
        eos = set()
        for src in (getattr(tokenizer, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, (list, tuple)):
                eos.update(int(i) for i in src)
        self.eos = eos
        self._prefix = None
        self._prefix_ready = False

    # ---- internals ------------------------------------------------------------------------------
    def _prefix_cache(self, handle):
        if not self._prefix_ready:
            if self.n >= 2:
                if handle is not None:
                    handle.route([None])
                with torch.inference_mode():
                    out = self.model(input_ids=self.ids[:, :-1], use_cache=True, logits_to_keep=1)
                self._prefix = output_cache(out)
            self._prefix_ready = True
        return self._prefix

    def _start(self, k: int, handle, reuse: bool):
        """(cache, input ids) for k rows: the copied prefix + last token, or the whole prompt."""
        if reuse and self.reuse_prefill:
            pre = self._prefix_cache(handle)
            if pre is not None:
                cache = copy.deepcopy(pre)
                if k > 1:
                    cache.batch_repeat_interleave(k)
                return cache, self.ids[:, -1:].repeat(k, 1)
        return None, self.ids.repeat(k, 1)

    def _finished_line(self, toks: list[int]) -> bool:
        text = self.tokenizer.decode(toks, skip_special_tokens=True).lstrip()
        return "\n" in text

    @staticmethod
    def _gating_of(handle, name) -> set[str]:
        return {e.gating for e in handle.plans[name].entries}

    # ---- API ------------------------------------------------------------------------------------
    def generate(self, rows: Sequence[str | None] = (None,), handle=None) -> list[list[int]]:
        """Generated token ids (EOS excluded) for each row: a plan name of ``handle`` or None."""
        rows = list(rows)
        if not rows:
            raise FusionError("generate needs at least one row")
        steered = [r for r in rows if r is not None]
        if steered and handle is None:
            raise FusionError("rows name plans but no handle was given")
        if handle is None:
            _check_unsteered(self.model, "unsteered generation")
        reuse = all(self._gating_of(handle, r) <= {"generated"} for r in steered) if steered else True
        k = len(rows)
        outs: list[list[int]] = [[] for _ in range(k)]
        done = [False] * k
        try:
            cache, x = self._start(k, handle, reuse)
            if handle is not None:
                handle.route(rows)
                handle.set_prompt_length(self.n - 1)
            with torch.inference_mode():
                for _ in range(self.max_new_tokens):
                    o = self.model(input_ids=x, use_cache=True, logits_to_keep=1, **with_cache(self.model, cache))
                    cache = output_cache(o)
                    nxt = o.logits[:, -1].float().argmax(-1)
                    for i in range(k):
                        if done[i]:
                            continue
                        t = int(nxt[i])
                        if t in self.eos:
                            done[i] = True
                            continue
                        outs[i].append(t)
                        if self.stop_at_newline and self._finished_line(outs[i]):
                            done[i] = True
                    if all(done):
                        break
                    x = nxt[:, None].to(torch.long)
        finally:
            if handle is not None:
                handle.set_prompt_length(None)
        return outs

    def decode(self, toks: Sequence[int]) -> str:
        return self.tokenizer.decode(list(toks), skip_special_tokens=True)

    def nll(self, answers: Sequence[Sequence[int]], handle=None) -> list[float]:
        """Mean NLL (nats/token) of each token list as a continuation of the prompt, **unsteered**
        (routed to no plan when a handle is attached). NaN for an empty list."""
        res = [math.nan] * len(answers)
        idx = [i for i, a in enumerate(answers) if len(a) > 0]
        if not idx:
            return res
        if handle is None:
            _check_unsteered(self.model, "the perplexity pass")
        cache, x0 = self._start(len(idx), handle, True)
        p = x0.shape[1]
        width = p + max(len(answers[i]) for i in idx)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        pad = int(pad) if isinstance(pad, int) else 0
        past = self.n - p
        X = torch.full((len(idx), width), pad, dtype=torch.long, device=self.device)
        M = torch.zeros((len(idx), past + width), dtype=torch.long, device=self.device)
        for r, i in enumerate(idx):
            a = torch.tensor(list(answers[i]), dtype=torch.long, device=self.device)
            X[r, :p] = x0[r]
            X[r, p:p + len(a)] = a
            M[r, :past + p + len(a)] = 1
        if handle is not None:
            handle.route([None] * len(idx))
        with torch.inference_mode():
            o = self.model(input_ids=X, attention_mask=M, use_cache=True, **with_cache(self.model, cache))
        logits = o.logits.float()
        for r, i in enumerate(idx):
            m = len(answers[i])
            lp = torch.log_softmax(logits[r, p - 1:p - 1 + m], dim=-1)
            tgt = X[r, p:p + m]
            res[i] = float(-lp.gather(-1, tgt[:, None]).mean())
        return res


def normalized_perplexity(nll: float, ppl_cap: float = DEFAULT_PPL_CAP) -> float:
    """min(1, log(ppl) / log(ppl_cap)) = min(1, NLL / ln(cap)), clipped to [0, 1]; 1 for NaN/inf."""
    if not (isinstance(ppl_cap, (int, float)) and ppl_cap > 1):
        raise FusionError(f"ppl_cap must be a number > 1, got {ppl_cap!r}")
    if nll is None or not math.isfinite(nll):
        return 1.0
    return min(1.0, max(0.0, nll / math.log(ppl_cap)))


def repetition_rate(tokens: Sequence[int]) -> float:
    """1 − distinct / total token bigrams of a generated sequence (0 for fewer than 3 tokens)."""
    toks = list(tokens)
    if len(toks) < 3:
        return 0.0
    bigrams = list(zip(toks, toks[1:]))
    return 1.0 - len(set(bigrams)) / len(bigrams)


def objective_score(overlap: float, nll: float, lam: float = DEFAULT_LAMBDA, ppl_cap: float = DEFAULT_PPL_CAP,
                    repetition: float = 0.0) -> float:
    """overlap − λ · max(normalized_perplexity(nll), repetition)  (repetition = 0 without the guard)."""
    return float(overlap) - float(lam) * max(normalized_perplexity(nll, ppl_cap), float(repetition))


# --------------------------------------------------------------------------------------------
# Explanations and references
# --------------------------------------------------------------------------------------------
def generate_explanation(model, tokenizer, question: str, truth: str, max_new_tokens: int = 48) -> str:
    """The model's own explanation of (question, truth): greedy, at most ``max_new_tokens``, first line."""
    _check_unsteered(model, "generate_explanation")
    if not isinstance(truth, str) or not truth.strip():
        raise FusionError(f"truth must be a non-empty string, got {truth!r:.80}")
    prompt = EXPLAIN_PROMPT.format(question=_clean_question(question), truth=truth.strip())
    runner = PromptRunner(model, tokenizer, prompt, max_new_tokens)
    return extract_answer(runner.decode(runner.generate([None])[0]))


def explanation_for(record: Mapping, source: str = "auto", model=None, tokenizer=None,
                    max_new_tokens: int = 48) -> tuple[str, str]:
    """(explanation, where it came from: "dataset" | "generated").

    ``source``: "dataset" (the record's ``explanation`` field; error if absent), "generate" (always the
    model's), "auto" (the record's if present, else the model's).
    """
    if source not in ("auto", "dataset", "generate"):
        raise FusionError(f"explanation source must be 'auto', 'dataset' or 'generate', got {source!r}")
    have = isinstance(record.get("explanation"), str) and record["explanation"].strip()
    if source == "dataset" or (source == "auto" and have):
        if not have:
            raise FusionError(f"record {record.get('id')!r} has no 'explanation' field; use source='generate'")
        return record["explanation"].strip(), "dataset"
    if model is None or tokenizer is None:
        raise FusionError("generating an explanation needs the model and tokenizer")
    return generate_explanation(model, tokenizer, record["question"], truth_of(record), max_new_tokens), "generated"


def token_span(tokenizer, prefix: str, full: str, add_special_tokens: bool = True) -> tuple[list[int], int, int]:
    """(ids of ``full``, start, end): the tokens of ``full`` that cover the text after ``prefix``.

    start = length of the common prefix of tokenize(prefix) and tokenize(full), so a token merging the end
    of the prefix with the start of the rest belongs to the span; trailing special tokens are excluded.
    """
    if not isinstance(prefix, str) or not isinstance(full, str):
        raise FusionError("prefix and full must be strings")
    if not full.startswith(prefix) or len(full) == len(prefix):
        raise FusionError("full text must extend the prefix with a non-empty target")
    p = _encode(tokenizer, prefix, add_special_tokens)
    f = _encode(tokenizer, full, add_special_tokens)
    start = 0
    while start < min(len(p), len(f)) and p[start] == f[start]:
        start += 1
    special = _special_ids(tokenizer)
    end = len(f)
    while end > start and f[end - 1] in special:
        end -= 1
    if end <= start:
        raise FusionError(f"the target {full[len(prefix):][:60]!r} tokenizes to no tokens after the prefix")
    return f, start, end


@dataclass
class Reference:
    """Per-prompt reference activations at ``layer.out``: h, μ (fp32, [L, hidden]) and Δ = h − μ."""

    h: torch.Tensor
    mu: torch.Tensor
    question: str
    truth: str
    explanation: str | None = None
    explanation_source: str | None = None
    span: tuple[int, int] = (0, 0)
    mu_span: tuple[int, int] = (0, 0)
    meta: dict = field(default_factory=dict)

    @property
    def variant(self) -> str:
        return "explanation" if self.explanation else "answer"

    @property
    def delta(self) -> torch.Tensor:
        return self.h - self.mu

    def save(self, path) -> None:
        from safetensors.torch import save_file

        info = {"question": self.question, "truth": self.truth, "explanation": self.explanation,
                "explanation_source": self.explanation_source, "span": list(self.span),
                "mu_span": list(self.mu_span), "meta": self.meta, "format": "fusesteer-fusion-reference"}
        path = os.fspath(path)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = path + f".tmp{os.getpid()}"
        save_file({"h": self.h.contiguous(), "mu": self.mu.contiguous()}, tmp, metadata={"fusion": json.dumps(info)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "Reference":
        from safetensors import safe_open

        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                info = json.loads((f.metadata() or {}).get("fusion", "null"))
                h, mu = f.get_tensor("h"), f.get_tensor("mu")
        except Exception as e:  # noqa: BLE001
            raise FusionError(f"cannot read reference file {os.fspath(path)!r}: {type(e).__name__}: {e}") from None
        if not isinstance(info, dict) or info.get("format") != "fusesteer-fusion-reference":
            raise FusionError(f"{os.fspath(path)!r} is not a fusion reference file")
        return cls(h=h.float(), mu=mu.float(), question=info["question"], truth=info["truth"],
                   explanation=info.get("explanation"), explanation_source=info.get("explanation_source"),
                   span=tuple(info.get("span", (0, 0))), mu_span=tuple(info.get("mu_span", (0, 0))),
                   meta=info.get("meta") or {})


def compute_reference(model, tokenizer, question: str, truth: str, explanation: str | None = None, *,
                      explanation_source: str | None = None, exclude_special: bool = True) -> Reference:
    """h_l, μ_l for every layer (see the module docstring). ``explanation=None`` → answer-only variant."""
    _check_unsteered(model, "compute_reference")
    prefix, target = enriched_parts(question, truth, explanation)
    ids, s, e = token_span(tokenizer, prefix, prefix + target)
    dev = _device(model)
    h = capture_span_mean(model, torch.tensor([ids], device=dev), [(s, e)], "layer.out")[0]
    qids = _encode(tokenizer, question_prompt(question))
    special = _special_ids(tokenizer) if exclude_special else set()
    a, b = 0, len(qids)
    while a < b and qids[a] in special:
        a += 1
    while b > a and qids[b - 1] in special:
        b -= 1
    if b <= a:
        raise FusionError("the question prompt has no non-special tokens")
    mu = capture_span_mean(model, torch.tensor([qids], device=dev), [(a, b)], "layer.out")[0]
    expl = explanation.strip() if isinstance(explanation, str) and explanation.strip() else None
    return Reference(h=h.float().cpu(), mu=mu.float().cpu(), question=_clean_question(question), truth=truth.strip(),
                     explanation=expl, explanation_source=explanation_source if expl else None,
                     span=(s, e), mu_span=(a, b), meta={"n_enriched_tokens": len(ids), "n_prompt_tokens": len(qids)})


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------
def segment_bounds(num_layers: int) -> list[tuple[int, int]]:
    """[(start, end)] of the early / middle / late thirds; the first ``L mod 3`` segments get one more layer."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 3:
        raise FusionError(f"segmented steering needs at least 3 layers, got {num_layers!r}")
    base, extra = divmod(num_layers, 3)
    out, start = [], 0
    for i in range(3):
        n = base + (1 if i < extra else 0)
        out.append((start, start + n))
        start += n
    return out


def param_space(mode: str) -> dict[str, tuple[float, float, bool]]:
    """Search space {name: (low, high, log)}: α ∈ [0, 1] uniform, γ ∈ [0.01, 1] log-uniform (a scale), one pair
    ("alpha", "gamma") or one per segment ("alpha_early", "gamma_early", …)."""
    if mode == "full":
        return {"alpha": ALPHA_RANGE, "gamma": GAMMA_RANGE}
    if mode == "segmented":
        sp = {}
        for s in SEGMENTS:
            sp[f"alpha_{s}"] = ALPHA_RANGE
            sp[f"gamma_{s}"] = GAMMA_RANGE
        return sp
    raise FusionError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")


def _num(params: Mapping, key: str) -> float:
    if key not in params:
        raise FusionError(f"missing parameter {key!r}")
    v = params[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise FusionError(f"parameter {key!r} must be a finite number, got {v!r}")
    return float(v)


def layer_params(params: Mapping, mode: str, num_layers: int) -> list[tuple[float, float]]:
    """(α, γ) for every layer."""
    if not isinstance(params, Mapping):
        raise FusionError(f"params must be a dict, got {type(params).__name__}")
    space = param_space(mode)
    unknown = set(params) - set(space)
    if unknown:
        raise FusionError(f"unknown parameter(s) {sorted(unknown)} for mode {mode!r}; expected {sorted(space)}")
    vals = {k: _num(params, k) for k in space}
    for k, v in vals.items():
        if k.startswith("alpha") and not 0.0 <= v <= 1.0:
            raise FusionError(f"{k} must lie in [0, 1], got {v}")
        if k.startswith("gamma") and v < 0.0:
            raise FusionError(f"{k} must be >= 0, got {v}")
    if mode == "full":
        return [(vals["alpha"], vals["gamma"])] * num_layers
    out = []
    for (s, e), name in zip(segment_bounds(num_layers), SEGMENTS):
        out += [(vals[f"alpha_{name}"], vals[f"gamma_{name}"])] * (e - s)
    return out


def fusion_plan(reference: Reference, model_or_spec, params: Mapping, mode: str = "full", blend: str = "paper",
                gating: str = "all", name: str | None = None) -> SteeringPlan:
    """The steering plan of one prompt: ``layer.out`` of every layer, blend per the module docstring."""
    spec = model_or_spec if isinstance(model_or_spec, ModelSpec) else ModelSpec.from_model(model_or_spec)
    if blend not in BLENDS:
        raise FusionError(f"unknown blend {blend!r}; expected one of {', '.join(BLENDS)}")
    if gating not in FUSION_GATINGS:
        raise FusionError(f"gating must be one of {', '.join(FUSION_GATINGS)} for Fusion Steering, got {gating!r}")
    L, W = spec.num_layers, spec.hidden_size
    if tuple(reference.h.shape) != (L, W) or tuple(reference.mu.shape) != (L, W):
        raise FusionError(f"reference has shape {tuple(reference.h.shape)}, the model needs ({L}, {W}); it was "
                          f"computed on another model")
    per_layer = layer_params(params, mode, L)
    delta = reference.delta
    plan = SteeringPlan(spec, name=name or f"fusion-{mode}")
    for l, (alpha, gamma) in enumerate(per_layer):
        if blend == "paper":
            plan.add(layer=l, site="layer.out", b=(alpha * gamma) * delta[l], gating=gating)
        else:
            plan.add(layer=l, site="layer.out", a=torch.tensor(1.0 - alpha),
                     b=((1.0 - alpha) * gamma) * delta[l] + alpha * reference.h[l], gating=gating)
    plan.metadata = {
        "method": "fusion", "mode": mode, "blend": blend, "gating": gating, "variant": reference.variant,
        "params": {k: float(v) for k, v in params.items()},
        "segments": [list(b) for b in segment_bounds(L)] if mode == "segmented" else [[0, L]],
        "steer_from": "last_prompt_token" if gating == "generated" else "all_tokens",
        "question": reference.question, "truth": reference.truth,
        "explanation_source": reference.explanation_source,
    }
    return plan


def average_params(params_list: Sequence[Mapping], mode: str) -> dict[str, float]:
    """Dataset-average α/γ (per key) over per-prompt best parameters."""
    if not params_list:
        raise FusionError("average_params needs at least one parameter set")
    keys = list(param_space(mode))
    return {k: sum(_num(p, k) for p in params_list) / len(params_list) for k in keys}


# --------------------------------------------------------------------------------------------
# Optuna studies
# --------------------------------------------------------------------------------------------
def _optuna():
    try:
        import optuna
    except ImportError as e:  # pragma: no cover
        raise FusionError(f"the per-prompt search needs optuna ({e}); pip install optuna") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def make_storage(url: str | os.PathLike | None, *, heartbeat_interval: int | None = 10,
                 grace_period: int | None = None):
    """An Optuna storage: None → in memory (one process, no resume); a ``scheme://`` URL → RDBStorage;
    anything else is taken as a SQLite file path. RDB storages record heartbeats every
    ``heartbeat_interval`` s (None disables them); trials silent for ``grace_period`` s (default 2×) are stale.
    """
    optuna = _optuna()
    if url is None:
        return optuna.storages.InMemoryStorage()
    url = os.fspath(url)
    if "://" not in url:
        url = "sqlite:///" + os.path.abspath(url)
    kw: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if path and path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kw["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_interval,
                                              grace_period=grace_period, **kw)
    except Exception as e:  # noqa: BLE001 - one clear message
        raise FusionError(f"cannot open the optuna storage {_safe_url(url)!r}: {type(e).__name__}: {e}") from None


def _safe_url(url) -> str:
    if url is None:
        return "memory"
    try:
        from sqlalchemy.engine import make_url

        return make_url(str(url)).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", str(url))


def study_name(dataset: str, record_id: str, mode: str, variant: str = "explanation", blend: str = "paper",
               gating: str = "all") -> str:
    """``fusion:{dataset}:{record id}:{mode}:{variant}:{blend}:{gating}``."""
    return f"fusion:{dataset}:{record_id}:{mode}:{variant}:{blend}:{gating}"


class _Heartbeat:
    """Records Optuna heartbeats for the trials being run (a daemon thread)."""

    def __init__(self, storage, interval: float):
        self.storage, self.interval = storage, interval
        self.ids: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="fusesteer-heartbeat")
        self._thread.start()

    def watch(self, ids: Sequence[int]) -> None:
        with self._lock:
            self.ids = list(ids)
        self._beat()

    def _beat(self) -> None:
        with self._lock:
            ids = list(self.ids)
        for tid in ids:
            try:
                self.storage.record_heartbeat(tid)
            except Exception as e:  # noqa: BLE001 - a missed beat only risks a stale mark later
                log.debug("heartbeat for trial %s failed: %s", tid, e)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _jsonable(x):
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def run_study(evaluate: Callable[[list[dict]], list[tuple[float, dict]]], space: Mapping[str, tuple[float, float]],
              *, study_name: str, storage=None, n_trials: int, seed: int = 0, batch_size: int = 1,
              config: Mapping | None = None, fail_running: bool = False, poll_interval: float = 0.5,
              worker: int = 0, n_startup_trials: int | None = None, progress: bool = True,
              desc: str | None = None, position: int | None = None):
    """Run (or resume, or join) a study until it holds ``n_trials`` COMPLETE trials; returns the study.

    ``evaluate(params_list) -> [(value, user_attrs), ...]`` scores a batch of parameter dicts (maximised).
    ``space``: {name: (low, high[, log])} sampled with ``suggest_float``. ``storage``: an Optuna storage, a URL,
    a SQLite path or None (in memory). ``config``: the objective's settings, stored in the study on
    creation; reloading with different settings raises :class:`FusionError`. See the module docstring
    for the exact-count, heartbeat and resume rules.
    """
    optuna = _optuna()
    from optuna.trial import TrialState

    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise FusionError(f"n_trials must be a positive integer, got {n_trials!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FusionError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not space:
        raise FusionError("empty search space")
    st = storage if isinstance(storage, optuna.storages.BaseStorage) else make_storage(storage)
    try:
        study = optuna.create_study(study_name=study_name, storage=st, direction="maximize", load_if_exists=True)
    except Exception as e:  # noqa: BLE001
        raise FusionError(f"cannot create or load study {study_name!r}: {type(e).__name__}: {e}") from None
    if list(study.directions) != [optuna.study.StudyDirection.MAXIMIZE]:
        raise FusionError(f"study {study_name!r} exists with direction(s) {study.directions}; expected maximize")
    if config is not None:
        cfg = _jsonable(dict(config))
        old = study.user_attrs.get("fusesteer_config")
        if old is None:
            study.set_user_attr("fusesteer_config", cfg)
        elif old != cfg:
            diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
            raise FusionError(f"study {study_name!r} was created with other settings ({', '.join(diff)} differ: "
                              f"{ {k: old.get(k) for k in diff} } vs { {k: cfg.get(k) for k in diff} }); use another "
                              f"storage or study, or the same settings")
    storage_obj = study._storage
    from optuna.storages._heartbeat import is_heartbeat_enabled

    hb_enabled = is_heartbeat_enabled(storage_obj)

    def fail_stale():
        if hb_enabled:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optuna.storages.fail_stale_trials(study)

    if fail_running:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            try:
                storage_obj.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except Exception:  # noqa: BLE001 - finished by another process meanwhile
                pass
    fail_stale()
    existing = len(study.get_trials(deepcopy=False))
    base_seed = int(hashlib.sha256(f"{int(seed)}:{study_name}".encode()).hexdigest()[:8], 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.sampler = optuna.samplers.TPESampler(
            seed=(base_seed + 7919 * int(worker) + existing) % (2 ** 32), multivariate=True, constant_liar=True,
            n_startup_trials=n_startup_trials if n_startup_trials is not None else max(2, n_trials // 3))
    heartbeat = _Heartbeat(storage_obj, storage_obj.get_heartbeat_interval()) if hb_enabled else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_trials, desc=desc or study_name, unit="trial", leave=False, position=position)
    waited_msg = False
    try:
        while True:
            fail_stale()
            trials = study.get_trials(deepcopy=False)
            complete = sum(t.state == TrialState.COMPLETE for t in trials)
            if bar is not None:
                bar.n = min(complete, n_trials)
                best = [t.value for t in trials if t.state == TrialState.COMPLETE]
                if best:
                    bar.set_postfix_str(f"best={max(best):.3f}")
                bar.refresh()
            if complete >= n_trials:
                break
            live = complete + sum(t.state == TrialState.RUNNING for t in trials)
            room = n_trials - live
            if room <= 0:
                if not waited_msg:
                    log.info("study %s: waiting for %d RUNNING trial(s) of other workers (stale ones fail after "
                             "their heartbeat grace period; fail_running=True if no other worker is alive)",
                             study_name, live - complete)
                    waited_msg = True
                time.sleep(poll_interval)
                continue
            with warnings.catch_warnings():  # "heartbeat is supposed to be used with Study.optimize": we beat
                warnings.simplefilter("ignore")
                asked = [study.ask() for _ in range(min(batch_size, room))]
            if heartbeat is not None:  # beat at once: a trial without any heartbeat never turns stale
                heartbeat.watch([t._trial_id for t in asked])
            live_numbers = sorted(t.number for t in study.get_trials(
                deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)))
            run = []
            for t in asked:
                if bisect.bisect_left(live_numbers, t.number) < n_trials:
                    run.append(t)
                else:
                    t.set_user_attr("surplus", True)
                    study.tell(t, state=TrialState.PRUNED)
            if not run:
                time.sleep(poll_interval)
                continue
            params = [{k: t.suggest_float(k, float(sp[0]), float(sp[1]), log=bool(sp[2]) if len(sp) > 2 else False)
                       for k, sp in space.items()} for t in run]
            if heartbeat is not None:
                heartbeat.watch([t._trial_id for t in run])
            try:
                results = evaluate(params)
                if not isinstance(results, (list, tuple)) or len(results) != len(run):
                    raise FusionError(f"evaluate returned {type(results).__name__} of length "
                                      f"{len(results) if hasattr(results, '__len__') else '?'}, expected {len(run)}")
            except BaseException:
                for t in run:
                    try:
                        study.tell(t, state=TrialState.FAIL)
                    except Exception:  # noqa: BLE001
                        pass
                raise
            finally:
                if heartbeat is not None:
                    heartbeat.watch([])
            for t, res in zip(run, results):
                value, attrs = res
                for k, v in (attrs or {}).items():
                    t.set_user_attr(k, _jsonable(v))
                value = float(value)
                if math.isfinite(value):
                    study.tell(t, value)
                else:
                    study.tell(t, state=TrialState.FAIL)
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if bar is not None:
            bar.close()
    return study


# --------------------------------------------------------------------------------------------
# One prompt
# --------------------------------------------------------------------------------------------
class PromptSearch:
    """The Fusion Steering objective of one prompt, attached once, evaluated in batches of trials.

    One attachment holds ``batch_size`` plan slots (``t0``…); each batch of parameter sets updates the slots
    in place (``handle.update``) and decodes one row per slot. Use as a context manager (detaches).
    """

    def __init__(self, model, tokenizer, reference: Reference, truths: Sequence[str], *, mode: str = "full",
                 blend: str = "paper", gating: str = "all", lam: float = DEFAULT_LAMBDA,
                 ppl_cap: float = DEFAULT_PPL_CAP, max_new_tokens: int = 24, batch_size: int = 4,
                 repetition_guard: bool = True, backend: str = "torch"):
        _check_unsteered(model, "PromptSearch")
        if mode not in MODES:
            raise FusionError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
            raise FusionError(f"lam must be a non-negative number, got {lam!r}")
        normalized_perplexity(0.0, ppl_cap)  # validates the cap
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise FusionError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model, self.tokenizer = model, tokenizer
        self.reference = reference
        self.truths = list(truths)
        self.mode, self.blend, self.gating = mode, blend, gating
        self.lam, self.ppl_cap = float(lam), float(ppl_cap)
        self.repetition_guard = bool(repetition_guard)
        self.batch_size = batch_size
        self.spec = ModelSpec.from_model(model)
        self.space = param_space(mode)
        self.runner = PromptRunner(model, tokenizer, question_prompt(reference.question), max_new_tokens)
        zero = {k: spec_[0] for k, spec_ in self.space.items()}
        placeholder = fusion_plan(reference, self.spec, zero, mode, blend, gating)
        self.slots = [f"t{i}" for i in range(batch_size)]
        self.handle = attach(model, {s: placeholder for s in self.slots}, backend=backend, check_finite=False)

    def plan(self, params: Mapping) -> SteeringPlan:
        return fusion_plan(self.reference, self.spec, params, self.mode, self.blend, self.gating)

    def evaluate(self, params_list: Sequence[Mapping]) -> list[tuple[float, dict]]:
        out = []
        for i in range(0, len(params_list), self.batch_size):
            chunk = list(params_list[i:i + self.batch_size])
            names = self.slots[:len(chunk)]
            for nm, p in zip(names, chunk):
                self.handle.update(nm, self.plan(p))
            gen = self.runner.generate(names, self.handle)
            nlls = self.runner.nll(gen, self.handle)
            for toks, nll in zip(gen, nlls):
                text = self.runner.decode(toks)
                ans = extract_answer(text)
                ov = token_overlap(ans, self.truths)
                pn = normalized_perplexity(nll, self.ppl_cap)
                rep = repetition_rate(toks) if self.repetition_guard else 0.0
                value = objective_score(ov, nll, self.lam, self.ppl_cap, rep)
                out.append((value, {"answer": ans, "overlap": ov, "nll": nll if math.isfinite(nll) else None,
                                    "ppl_norm": pn, "repetition": rep, "n_tokens": len(toks)}))
        return out

    def close(self) -> None:
        self.handle.detach()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _config(model, reference: Reference, *, mode, blend, gating, lam, ppl_cap, max_new_tokens,
            repetition_guard) -> dict:
    ex = reference.explanation or ""
    return {"model": ModelSpec.from_model(model).fingerprint(), "mode": mode, "blend": blend, "gating": gating,
            "lam": float(lam), "ppl_cap": float(ppl_cap), "max_new_tokens": int(max_new_tokens),
            "repetition_guard": bool(repetition_guard),
            "variant": reference.variant, "truth": reference.truth,
            "explanation_sha": hashlib.sha256(ex.encode()).hexdigest()[:16]}


def optimize_prompt(model, tokenizer, reference: Reference, truths: Sequence[str], *, n_trials: int = 16,
                    mode: str = "full", blend: str = "paper", gating: str = "all", lam: float = DEFAULT_LAMBDA,
                    ppl_cap: float = DEFAULT_PPL_CAP, max_new_tokens: int = 24, batch_size: int = 4,
                    storage=None, name: str | None = None, seed: int = 0, worker: int = 0,
                    fail_running: bool = False, progress: bool = True, position: int | None = None,
                    repetition_guard: bool = True, backend: str = "torch") -> dict:
    """Search (α, γ) for one prompt; returns the best trial and its plan (``"plan"``, a SteeringPlan)."""
    optuna = _optuna()
    name = name or study_name("adhoc", hashlib.sha256(reference.question.encode()).hexdigest()[:12], mode,
                              reference.variant, blend, gating)
    cfg = _config(model, reference, mode=mode, blend=blend, gating=gating, lam=lam, ppl_cap=ppl_cap,
                  max_new_tokens=max_new_tokens, repetition_guard=repetition_guard)
    with PromptSearch(model, tokenizer, reference, truths, mode=mode, blend=blend, gating=gating, lam=lam,
                      ppl_cap=ppl_cap, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      repetition_guard=repetition_guard, backend=backend) as search:
        study = run_study(search.evaluate, search.space, study_name=name, storage=storage, n_trials=n_trials,
                          seed=seed, batch_size=batch_size, config=cfg, fail_running=fail_running,
                          worker=worker, progress=progress, position=position)
        best = study.best_trial
        plan = search.plan(best.params)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    plan.metadata.update({"score": best.value, "study": name, "trial": best.number})
    return {"study": name, "n_complete": len(complete), "best_value": best.value, "best_params": dict(best.params),
            "best_trial": best.number, "best_attrs": dict(best.user_attrs), "plan": plan,
            "values": [t.value for t in sorted(complete, key=lambda t: t.number)]}


# --------------------------------------------------------------------------------------------
# A dataset: optimize, then evaluate
# --------------------------------------------------------------------------------------------
def _safe_id(rid: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]", "_", str(rid))[:80]
    if s != str(rid):
        s += "-" + hashlib.sha256(str(rid).encode()).hexdigest()[:8]
    return s


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _baseline(model, tokenizer, record, max_new_tokens, judge, cache_file: Path | None, fp: str) -> dict:
    if cache_file is not None:
        old = _read_json(cache_file)
        if old and old.get("max_new_tokens") == max_new_tokens and old.get("model") == fp:
            return old
    runner = PromptRunner(model, tokenizer, question_prompt(record["question"]), max_new_tokens)
    ans = extract_answer(runner.decode(runner.generate([None])[0]))
    g = grade(record["question"], ans, truths_of(record), judge)
    out = {"id": record["id"], "question": record["question"], "truths": truths_of(record), "answer": ans,
           "grade": g.to_dict(), "max_new_tokens": max_new_tokens, "model": fp}
    if cache_file is not None:
        _write_json(cache_file, out)
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
            sid = _safe_id(rid)
            base = _baseline(model, tokenizer, rec, max_new_tokens, judge, out / "baseline" / f"{sid}.json", fp)
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
                    ans = res["best_attrs"].get("answer", "")
                    g = grade(rec["question"], ans, truths_of(rec), judge)
                    result = {"id": rid, "question": rec["question"], "truths": truths_of(rec), "mode": mode,
                              "variant": variant, "blend": blend, "gating": gating, "lam": lam, "ppl_cap": ppl_cap,
                              "repetition_guard": repetition_guard,
                              "max_new_tokens": max_new_tokens, "n_trials": n_trials, "model": fp,
                              "explanation": ref.explanation, "explanation_source": ref.explanation_source,
                              "plan": str(pfile.relative_to(out)),
                              "reference": str((out / "refs" / f"{sid}.{variant}.safetensors").relative_to(out)),
                              "grade": g.to_dict(), **res}
                    _write_json(out / "results" / f"{sid}.{mode}.{variant}.json", result)
                    entry["runs"].append({"mode": mode, "variant": variant, "best_value": res["best_value"],
                                          "accurate": g.accurate, "answer": ans})
            summary["records"].append(entry)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
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
    results = [r for r in (_read_json(f) for f in files) if isinstance(r, dict) and "id" in r]
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
                    "optimizer_answers": {_arm_name(r["mode"], r["variant"]): r["best_attrs"].get("answer")
                                          for r in rs}}
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
    return {
        "run": str(run), "n_prompts": len(items), "n_baseline_failed": len(failed),
        "max_new_tokens": max_new_tokens, "judge": getattr(judge, "name", type(judge).__name__),
        "average_params": {f"{m}/{v}": p for (m, v), p in avg_params.items()},
        "arms": arms, "summary_failed": summ(failed), "summary_all": summ(items), "comparisons": comparisons,
        "optimizer_answer_reproduced": [consistent, total_opt], "items": items,
    }


def _comparisons(items: Sequence[Mapping], arms: Sequence[str]) -> list[dict]:
    """Paired accuracy differences (bootstrap 95% CI, exact McNemar p) on the same prompts: every arm vs the
    baseline, segmented vs full, and each per-prompt arm vs its answer-only and dataset-average ablations."""
    from ..evaluate.stats import mcnemar_p, paired_bootstrap_diff

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
                    "a_only": sum(x and not y for x, y in zip(ca, cb)), "b_only": sum(y and not x for x, y in zip(ca, cb))})
    return out


def write_report(report: Mapping, out_dir, stem: str = "fusion_eval", title: str = "Fusion Steering evaluation",
                 notes: Sequence[str] = ()) -> dict[str, str]:
    """Write ``{stem}.json``, ``{stem}.md`` (table) and ``{stem}.png`` (accuracy by arm); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / f"{stem}.json"), "md": str(out / f"{stem}.md"), "png": str(out / f"{stem}.png")}
    _write_json(Path(paths["json"]), report)
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
                  "| A | B | n | A − B | 95% CI | McNemar p | only A | only B |", "|---|---|---:|---:|---|---:|---:|---:|"]
        for c in comps:
            lines.append(f"| {c['a']} | {c['b']} | {c['n']} | {c['diff']:+.3f} | [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] | "
                         f"{c['mcnemar_p']:.3g} | {c['a_only']} | {c['b_only']} |")
    if report.get("average_params"):
        lines += ["", "Dataset-average α/γ: " + "; ".join(
            f"{k}: " + ", ".join(f"{p}={v:.3f}" for p, v in ps.items()) for k, ps in report["average_params"].items())]
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
