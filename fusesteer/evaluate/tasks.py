"""Task evaluation harness: datasets, prompts, choice scoring, accuracy with confidence intervals.

Three kinds of records (all JSONL, one object a line):

* ``yesno`` — ``question`` and ``answer`` ("Yes" / "No"); e.g. ``strategyqa``.
* ``mc``    — ``question``, ``choices`` (list of >= 2 strings) and ``answer_index``;
  e.g. ``truthfulqa_mc``, ``cause_effect``.
* ``open``  — ``question`` and ``answers`` (list of reference strings); e.g. ``freshqa``.
  Loaded and validated here, prompted with :func:`format_prompt`, but not scorable by
  :func:`evaluate` (open answers need generation + grading).

Every record may carry an ``id`` (string); a missing one becomes ``"<file stem>-<line>"``.

Scoring is by log-likelihood of each choice as a continuation of the prompt (plain forwards of
the model; steering, if any, is attached to the model by the caller beforehand)::

    yes/no:  "Question: {q}\\nAnswer (Yes or No):"   choices " Yes", " No"
    mc:      "Question: {q}\\nAnswer:"               choices " {choice}" for each choice

The bundled multiple-choice files always put the right answer at index 0. Choices are scored
independently, so their order does not matter, except for ties: an item whose best score is
shared by several choices, or whose scores are not finite, is counted as wrong (a degenerate
model must not score 100% by always picking index 0).
"""

from __future__ import annotations

import math
import time
from typing import Mapping, Sequence

import torch

from .datasets import (  # noqa: F401
    _YESNO,
    BUILTIN_DATASETS,
    KINDS,
    SCORABLE_KINDS,
    DatasetError,
    _builtin_path,
    _record_kind,
    check_kind_for,
    load_dataset,
    split,
    task_kind,
    validate_record,
)
from .records import (  # noqa: F401 - the prompt and batching helpers, public through this module too
    EvalResult,
    EvaluationError,
    ItemResult,
    PromptCache,
    _check_kind,
    _ids,
    _max_positions,
    _plain_prompt,
    _vocab_limit,
    check_batch_size,
    check_seqs,
    choice_texts,
    encode_continuation,
    format_prompt,
    gold_index,
    pad_id,
    padded_batch,
    run_batches,
)
from .stats import wilson_ci

__all__ = [
    "DatasetError",
    "EvaluationError",
    "BUILTIN_DATASETS",
    "KINDS",
    "load_dataset",
    "validate_record",
    "task_kind",
    "split",
    "format_prompt",
    "choice_texts",
    "gold_index",
    "encode_continuation",
    "score_choices",
    "yesno_logits",
    "ItemResult",
    "EvalResult",
    "evaluate",
]


def _flatten_pairs(prompts, choices):
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise EvaluationError("prompts must be a list of strings")
    if not isinstance(choices, Sequence) or len(choices) != len(prompts):
        raise EvaluationError(
            f"choices must be a list with one list of continuations per prompt "
            f"({len(prompts)} prompts, got {len(choices) if isinstance(choices, Sequence) else type(choices).__name__})"
        )
    for i, (p, cs) in enumerate(zip(prompts, choices)):
        if not isinstance(p, str):
            raise EvaluationError(f"prompts[{i}] must be a string, got {type(p).__name__}")
        if isinstance(cs, str) or not isinstance(cs, Sequence) or not cs:
            raise EvaluationError(f"choices[{i}] must be a non-empty list of strings")
        for j, c in enumerate(cs):
            if not isinstance(c, str) or not c:
                raise EvaluationError(f"choices[{i}][{j}] must be a non-empty string")


def score_choices(model, tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]], batch_size: int = 8,
                  normalize: str = "sum", *, add_special_tokens: bool = True, progress: bool = False,
                  return_tokens: bool = False):
    """Log-likelihood of each continuation ``choices[i][j]`` given ``prompts[i]``.

    Every (prompt, choice) pair is one sequence ``prompt_ids + cont_ids`` (see
    :func:`encode_continuation`); sequences are right-padded with an attention mask and run in
    batches of ``batch_size``. Scores are log-softmax in fp32 of the logits predicting each
    continuation token, summed (``normalize="sum"``) or averaged per token (``"mean"``).

    Returns ``scores[i][j]`` (a list of lists of floats). With ``return_tokens=True`` returns
    ``(scores, token_logprobs)`` where ``token_logprobs[i][j]`` is the list of per-token log-probs.
    """
    if normalize not in ("sum", "mean"):
        raise EvaluationError(f"normalize must be 'sum' or 'mean', got {normalize!r}")
    check_batch_size(batch_size)
    _flatten_pairs(prompts, choices)
    if not prompts:
        return ([], []) if return_tokens else []
    cache = PromptCache(tokenizer, add_special_tokens)
    seqs: list[list[int]] = []
    spans: list[tuple[int, int]] = []  # (start of continuation, end)
    where: list[tuple[int, int]] = []
    for i, (p, cs) in enumerate(zip(prompts, choices)):
        for j, c in enumerate(cs):
            pids, cids = encode_continuation(tokenizer, p, c, add_special_tokens=add_special_tokens, _cache=cache)
            seqs.append(pids + cids)
            spans.append((len(pids), len(pids) + len(cids)))
            where.append((i, j))
    tok_lp: list[list[float] | None] = [None] * len(seqs)

    def collect(k, row_logits):
        a, b = spans[k]
        lp = torch.log_softmax(row_logits[a - 1 : b - 1].float(), dim=-1)
        tgt = torch.tensor(seqs[k][a:b], dtype=torch.long, device=lp.device)
        tok_lp[k] = lp.gather(-1, tgt[:, None])[:, 0].cpu().tolist()

    run_batches(model, seqs, batch_size, pad_id(tokenizer), collect, progress, "scoring choices")
    scores = [[0.0] * len(cs) for cs in choices]
    toks = [[None] * len(cs) for cs in choices]
    for k, (i, j) in enumerate(where):
        t = tok_lp[k]
        s = math.fsum(t)
        scores[i][j] = s / len(t) if normalize == "mean" else s
        toks[i][j] = t
    return (scores, toks) if return_tokens else scores


def yesno_logits(model, tokenizer, prompts: Sequence[str], batch_size: int = 8,
                 choices: Sequence[str] = (" Yes", " No"), *, add_special_tokens: bool = True,
                 progress: bool = False) -> list[list[float]]:
    """Next-token scores of the first token of each choice (default " Yes", " No") after each prompt.

    Returns ``scores[i][j]`` = fp32 log-softmax of the next-token logits at the last prompt token,
    at the first token of ``choices[j]`` (tokenized in context, as :func:`encode_continuation`).
    The difference between two scores equals the difference of raw logits; for single-token
    choices the scores equal those of :func:`score_choices`.
    """
    check_batch_size(batch_size)
    choices = list(choices)
    _flatten_pairs(prompts, [choices] * len(prompts))
    if not prompts:
        return []
    cache = PromptCache(tokenizer, add_special_tokens)
    seqs, firsts = [], []
    for p in prompts:
        ids = None
        first = []
        for c in choices:
            pids, cids = encode_continuation(tokenizer, p, c, add_special_tokens=add_special_tokens, _cache=cache)
            ids = pids
            first.append(cids[0])
        if len(set(first)) < len(first):
            raise EvaluationError(
                f"choices {choices!r} share their first token after prompt {p[-40:]!r}: "
                f"next-token logits cannot tell them apart; use method='logprob'"
            )
        seqs.append(ids)
        firsts.append(first)
    out: list[list[float] | None] = [None] * len(seqs)

    def collect(k, row_logits):
        lp = torch.log_softmax(row_logits[-1].float(), dim=-1)
        out[k] = lp[torch.tensor(firsts[k], dtype=torch.long, device=lp.device)].cpu().tolist()

    run_batches(model, seqs, batch_size, pad_id(tokenizer), collect, progress, "scoring next token")
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
def _pick(scores: Sequence[float]) -> tuple[int, bool]:
    """(index of the unique best finite score or -1, whether the top was tied)."""
    if not scores or not all(math.isfinite(s) for s in scores):
        return -1, False
    best = max(scores)
    top = [j for j, s in enumerate(scores) if s == best]
    if len(top) > 1:
        return -1, True
    return top[0], False


METHODS = ("logprob", "logits", "generate")


def evaluate(model, tokenizer, records: Sequence[Mapping], kind: str | None = None, batch_size: int = 8,
             method: str = "logprob", normalize: str = "sum", *, chat_template: bool = False,
             progress: bool = True, name: str | None = None, template: str | None = None,
             max_new_tokens: int = 1) -> EvalResult:
    """Accuracy of ``model`` on yes/no or multiple-choice ``records``.

    ``method="logprob"`` scores each choice's continuation log-likelihood (:func:`score_choices`,
    ``normalize`` "sum" or "mean"); ``method="logits"`` (yes/no only) compares the next-token
    scores of " Yes" and " No" (:func:`yesno_logits`). The prediction is the unique best-scoring
    choice; ties and non-finite scores count as wrong. ``ci_low``/``ci_high`` are the Wilson 95%
    interval of the accuracy. The model runs plain forwards only: attach steering beforehand.

    ``method="generate"`` scores the greedy continuation instead (:mod:`fusesteer.evaluate.generate`:
    ``template`` "letter" (default) or "cloze", ``max_new_tokens`` new tokens, exact match after strip and
    lowercase, non-answers counted). The forced-choice methods use the cloze prompts only.
    """
    if method not in METHODS:
        raise EvaluationError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "generate" and template not in (None, "cloze"):
        raise EvaluationError(f"template {template!r} is scored by generation (method='generate'); "
                              f"{method!r} scores the cloze prompts")
    if normalize not in ("sum", "mean"):
        raise EvaluationError(f"normalize must be 'sum' or 'mean', got {normalize!r}")
    if isinstance(records, Mapping) or not isinstance(records, Sequence) or not records:
        raise EvaluationError("records must be a non-empty list of task records")
    if kind is None:
        kind = task_kind(records)
    if kind not in SCORABLE_KINDS:
        raise EvaluationError(
            f"kind {kind!r} cannot be scored by choice; evaluate handles {', '.join(SCORABLE_KINDS)} "
            f"(open-ended answers need generation and grading)"
        )
    if method == "logits" and kind != "yesno":
        raise EvaluationError("method='logits' applies to yes/no tasks only; use method='logprob'")
    recs = [validate_record(r, kind, f"record {i}") for i, r in enumerate(records)]
    for i, r in enumerate(recs):
        r.setdefault("id", str(i))
    if method == "generate":
        from .generate import evaluate_generate

        if chat_template:
            raise EvaluationError("method='generate' uses its own templates; chat_template is not supported")
        check_batch_size(batch_size)
        return evaluate_generate(model, tokenizer, recs, kind, template=template or "letter",
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, name=name)

    t0 = time.perf_counter()
    prompts = [format_prompt(r, kind, tokenizer=tokenizer, chat_template=chat_template) for r in recs]
    add_special = not chat_template
    if method == "logits":
        yes_no = choice_texts(recs[0], "yesno", chat_template=chat_template)
        scores = yesno_logits(model, tokenizer, prompts, batch_size, yes_no,
                              add_special_tokens=add_special, progress=progress)
    else:
        choices = [choice_texts(r, kind, chat_template=chat_template) for r in recs]
        scores = score_choices(model, tokenizer, prompts, choices, batch_size, normalize,
                               add_special_tokens=add_special, progress=progress)
    elapsed = time.perf_counter() - t0

    items = []
    for r, sc in zip(recs, scores):
        g = gold_index(r, kind)
        pred, tie = _pick(sc)
        items.append(ItemResult(id=str(r["id"]), gold=g, pred=pred, correct=pred == g, scores=list(sc), tie=tie))
    n = len(items)
    k = sum(it.correct for it in items)
    lo, hi = wilson_ci(k, n)
    return EvalResult(kind=kind, method=method, normalize=normalize if method == "logprob" else "-",
                      n=n, correct=k, accuracy=k / n, ci_low=lo, ci_high=hi, elapsed_s=elapsed,
                      items=items, name=name)
