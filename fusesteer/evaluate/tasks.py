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
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import torch

from ..errors import FuseSteerError
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


class EvaluationError(FuseSteerError, ValueError):
    """Bad arguments to the scoring / evaluation functions (or a model/tokenizer mismatch)."""


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------
def _check_kind(kind: str | None, rec: Mapping) -> str:
    if kind is None:
        kind = _record_kind(rec)
        if kind is None:
            raise DatasetError("record has no answer field; cannot tell its task kind")
    if kind not in KINDS:
        raise DatasetError(f"unknown task kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


def _plain_prompt(record: Mapping, kind: str) -> str:
    q = record.get("question")
    if not isinstance(q, str) or not q.strip():
        raise DatasetError(f"record {record.get('id', '?')!r}: field 'question' must be a non-empty string")
    q = q.strip()
    if kind == "yesno":
        return f"Question: {q}\nAnswer (Yes or No):"
    return f"Question: {q}\nAnswer:"


def format_prompt(record: Mapping, kind: str | None = None, *, tokenizer=None, chat_template: bool = False) -> str:
    """The prompt text for one record.

    * yesno: ``"Question: {q}\\nAnswer (Yes or No):"``
    * mc / open: ``"Question: {q}\\nAnswer:"``

    With ``chat_template=True`` the plain prompt becomes the user turn of
    ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``; the choices then carry no
    leading space (see :func:`choice_texts`), and the prompt should be tokenized without adding
    special tokens (``score_choices(..., add_special_tokens=False)``, done by :func:`evaluate`).
    """
    kind = _check_kind(kind, record)
    text = _plain_prompt(record, kind)
    if not chat_template:
        return text
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise EvaluationError("chat_template=True needs a tokenizer that has a chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def choice_texts(record: Mapping, kind: str | None = None, *, chat_template: bool = False) -> list[str]:
    """The continuations scored for a record: ``[" Yes", " No"]`` for yesno, ``[" " + c ...]`` for mc
    (without the leading space when ``chat_template`` is True)."""
    kind = _check_kind(kind, record)
    sp = "" if chat_template else " "
    if kind == "yesno":
        return [sp + "Yes", sp + "No"]
    if kind == "mc":
        ch = record.get("choices")
        if not isinstance(ch, list) or len(ch) < 2:
            raise DatasetError(f"record {record.get('id', '?')!r}: field 'choices' must be a list of >= 2 strings")
        return [sp + str(c).strip() for c in ch]
    raise DatasetError("open-ended records have no choices to score")


def gold_index(record: Mapping, kind: str | None = None) -> int:
    """Index of the right continuation in :func:`choice_texts` (Yes → 0, No → 1 for yesno)."""
    kind = _check_kind(kind, record)
    if kind == "yesno":
        a = str(record.get("answer", "")).strip().lower()
        if a not in _YESNO:
            raise DatasetError(f"record {record.get('id', '?')!r}: field 'answer' must be \"Yes\" or \"No\"")
        return 0 if a == "yes" else 1
    if kind == "mc":
        return int(record["answer_index"])
    raise DatasetError("open-ended records have no gold choice index")


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------
def _ids(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    out = tokenizer(text, add_special_tokens=add_special_tokens)
    ids = out["input_ids"] if isinstance(out, Mapping) or hasattr(out, "keys") else out
    if ids and isinstance(ids[0], list):  # batched by mistake
        ids = ids[0]
    return [int(i) for i in ids]


class _PromptCache:
    """Tokenizes each distinct prompt once: (special-token prefix + plain prompt ids)."""

    def __init__(self, tokenizer, add_special_tokens: bool):
        self.tok = tokenizer
        self.add_special = add_special_tokens
        self._cache: dict[str, tuple[list[int], list[int]]] = {}

    def prompt(self, text: str) -> tuple[list[int], list[int]]:
        """Returns (special prefix ids, plain prompt ids)."""
        hit = self._cache.get(text)
        if hit is not None:
            return hit
        plain = _ids(self.tok, text, False)
        prefix: list[int] = []
        if self.add_special:
            full = _ids(self.tok, text, True)
            # keep special tokens the tokenizer puts before the text (BOS); drop any it appends (EOS)
            n = len(plain)
            for i in range(len(full) - n + 1):
                if full[i : i + n] == plain:
                    prefix = full[:i]
                    break
        self._cache[text] = (prefix, plain)
        return prefix, plain


def encode_continuation(tokenizer, prompt: str, continuation: str, *, add_special_tokens: bool = True,
                        _cache: _PromptCache | None = None) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of ``continuation`` following it: ``(prompt_ids, cont_ids)``.

    The continuation ids are those of ``prompt + continuation`` after the prompt's own tokens, so
    they are tokenized as they would be in running text. If the tokenizer merges tokens across the
    boundary (the joint tokenization does not start with the prompt's tokens), the continuation is
    tokenized on its own and the two id lists are concatenated. ``prompt_ids`` include the
    tokenizer's leading special tokens (BOS) when ``add_special_tokens`` is True, never trailing ones.
    """
    cache = _cache or _PromptCache(tokenizer, add_special_tokens)
    prefix, plain = cache.prompt(prompt)
    joint = _ids(tokenizer, prompt + continuation, False)
    n = len(plain)
    if len(joint) > n and joint[:n] == plain:
        cont = joint[n:]
    else:
        cont = _ids(tokenizer, continuation, False)
    if not cont:
        raise EvaluationError(f"continuation {continuation!r} tokenizes to no tokens")
    p = prefix + plain
    if not p:
        raise EvaluationError(
            "the prompt tokenizes to no tokens and the tokenizer adds no BOS: nothing to condition on"
        )
    return p, cont


# --------------------------------------------------------------------------------------------
# Forwards
# --------------------------------------------------------------------------------------------
def _model_device(model) -> torch.device:
    try:
        emb = model.get_input_embeddings()
        return emb.weight.device
    except Exception:
        pass
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _vocab_limit(model) -> int | None:
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except Exception:
        v = getattr(getattr(model, "config", None), "vocab_size", None)
        return int(v) if v else None


def _max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    v = getattr(cfg, "max_position_embeddings", None)
    return int(v) if isinstance(v, int) and v > 0 else None


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0  # right padding: pad positions are masked and come after every scored token


def _check_seqs(model, seqs: list[list[int]]) -> None:
    vmax = _vocab_limit(model)
    if vmax is not None:
        top = max(max(s) for s in seqs)
        if top >= vmax:
            raise EvaluationError(
                f"token id {top} is outside the model's vocabulary of {vmax}: tokenizer and model do not match"
            )
    pmax = _max_positions(model)
    if pmax is not None:
        longest = max(len(s) for s in seqs)
        if longest > pmax:
            raise EvaluationError(f"a prompt+choice is {longest} tokens, over the model's limit of {pmax}")


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch_size must be a positive integer, got {batch_size!r}")


def padded_batch(seqs: Sequence[Sequence[int]], pad: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) int64 [len(seqs), longest]: the token id lists right-aligned (``left`` padding)
    or left-aligned (right padding), padded with ``pad``."""
    width = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, q in enumerate(seqs):
        sl = slice(width - len(q), width) if left else slice(0, len(q))
        ids[r, sl] = torch.tensor(list(q), dtype=torch.long)
        mask[r, sl] = 1
    return ids, mask


def _run_batches(model, seqs: list[list[int]], batch_size: int, pad_id: int, collect, progress, desc: str):
    """Right-pads ``seqs`` into batches (longest first), runs plain forwards under no_grad and calls
    ``collect(seq_index, logits_row)`` for every row (logits of the unpadded part only)."""
    _check_seqs(model, seqs)
    device = _model_device(model)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(seqs), desc=desc, unit="seq", leave=False)
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(order), batch_size):
                chunk = order[s : s + batch_size]
                ids, mask = padded_batch([seqs[i] for i in chunk], pad_id)
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
                logits = out.logits if hasattr(out, "logits") else out[0]
                if logits.dim() != 3 or logits.shape[:2] != ids.shape:
                    raise EvaluationError(
                        f"model returned logits of shape {tuple(logits.shape)} for input {tuple(ids.shape)}"
                    )
                for r, i in enumerate(chunk):
                    collect(i, logits[r, : len(seqs[i])])
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if was_training:
            model.train()
        if bar is not None:
            bar.close()


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
    _check_batch_size(batch_size)
    _flatten_pairs(prompts, choices)
    if not prompts:
        return ([], []) if return_tokens else []
    cache = _PromptCache(tokenizer, add_special_tokens)
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

    _run_batches(model, seqs, batch_size, _pad_id(tokenizer), collect, progress, "scoring choices")
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
    _check_batch_size(batch_size)
    choices = list(choices)
    _flatten_pairs(prompts, [choices] * len(prompts))
    if not prompts:
        return []
    cache = _PromptCache(tokenizer, add_special_tokens)
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

    _run_batches(model, seqs, batch_size, _pad_id(tokenizer), collect, progress, "scoring next token")
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
@dataclass
class ItemResult:
    """One scored item. ``pred`` is -1 when no choice wins (non-finite scores or a tie at the top)."""

    id: str
    gold: int
    pred: int
    correct: bool
    scores: list[float]
    tie: bool = False
    output: str | None = None  # generated continuation (method "generate")
    non_answer: bool = False  # the continuation matched no option (method "generate")


@dataclass
class EvalResult:
    kind: str
    method: str
    normalize: str
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    elapsed_s: float
    items: list[ItemResult] = field(default_factory=list)
    name: str | None = None
    non_answers: int | None = None  # method "generate": continuations that matched no option

    @property
    def correct_vector(self) -> list[bool]:
        """Per-item correctness, in item order (for :mod:`fusesteer.evaluate.stats`)."""
        return [it.correct for it in self.items]

    def to_dict(self, items: bool = True) -> dict:
        d = asdict(self)
        if not items:
            d.pop("items")
        return d

    def table(self) -> str:
        """A one-row markdown table."""
        name = self.name or self.kind
        na = self.non_answers is not None
        return (
            "| task | kind | method | n | correct | accuracy | 95% CI (Wilson) | "
            + ("non-answers | " if na else "") + "scoring time (s) |\n"
            "|---|---|---|---:|---:|---:|---|" + ("---:|" if na else "") + "---:|\n"
            f"| {name} | {self.kind} | {self.method}/{self.normalize} | {self.n} | {self.correct} | "
            f"{self.accuracy:.3f} | [{self.ci_low:.3f}, {self.ci_high:.3f}] | "
            + (f"{self.non_answers} | " if na else "") + f"{self.elapsed_s:.1f} |"
        )


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
        _check_batch_size(batch_size)
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
