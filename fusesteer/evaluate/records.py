"""Records to model inputs and back: the prompt and answer texts of a yes/no or choice record, their
tokenization, the batched forwards every scorer runs, and the result records (``tasks`` scores by
log-likelihood, ``generate`` by the greedy continuation; both build on these).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import torch

from ..errors import FuseSteerError
from ..runtime.backends.base import model_device
from .datasets import _YESNO, KINDS, DatasetError, _record_kind


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


class PromptCache:
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
                        _cache: PromptCache | None = None) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of ``continuation`` following it: ``(prompt_ids, cont_ids)``.

    The continuation ids are those of ``prompt + continuation`` after the prompt's own tokens, so
    they are tokenized as they would be in running text. If the tokenizer merges tokens across the
    boundary (the joint tokenization does not start with the prompt's tokens), the continuation is
    tokenized on its own and the two id lists are concatenated. ``prompt_ids`` include the
    tokenizer's leading special tokens (BOS) when ``add_special_tokens`` is True, never trailing ones.
    """
    cache = _cache or PromptCache(tokenizer, add_special_tokens)
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


def pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0  # right padding: pad positions are masked and come after every scored token


def check_seqs(model, seqs: list[list[int]]) -> None:
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


def check_batch_size(batch_size) -> None:
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


def run_batches(model, seqs: list[list[int]], batch_size: int, pad_id: int, collect, progress, desc: str):
    """Right-pads ``seqs`` into batches (longest first), runs plain forwards under no_grad and calls
    ``collect(seq_index, logits_row)`` for every row (logits of the unpadded part only)."""
    check_seqs(model, seqs)
    device = model_device(model)
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
