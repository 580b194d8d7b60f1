"""Generated-answer scoring, as the AUSteer authors score yes/no and choice tasks, and the templates it reads.

The model answers each prompt greedily (``max_new_tokens`` new tokens, 1 by default as in the authors' code for
BoolQ / COPA / WinoGrande); the continuation is stripped and lowercased and must equal one of the accepted
answers of an option exactly. A continuation that matches no option is a **non-answer**: wrong, and counted
apart (``EvalResult.non_answers``), so a steering that breaks the output format shows as such.

Templates (:func:`format_task`):

* ``letter`` — the authors' kind of prompt. Yes/no::

      Answer the question with 'yes' or 'no'.

      Question: {q}

      Answer:

  accepted answers ``yes`` / ``no``; the pair continuations are ``Yes`` / ``No``, appended to the prompt
  without a space (the authors concatenate ``prompt + answer``). Multiple choice::

      Answer with the letter of the correct option (A, B or C).

      Question: {q}
      A. {option}
      B. {option}
      C. {option}
      Answer:

  accepted answers: the letter or the option's full text; continuations ``A``, ``B``, ... The bundled files put
  the right choice first, so the options are listed in an order drawn per record
  (:func:`option_order`: ``random.Random(f"options:{id}")``) — otherwise always answering "A" would score 100%.
* ``cloze`` — fusesteer's forced-choice prompts (:func:`fusesteer.evaluate.tasks.format_prompt`); accepted
  answers: ``yes`` / ``no``, or a choice's full text.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..runtime.backends.base import model_device
from .records import (
    EvalResult,
    EvaluationError,
    ItemResult,
    PromptCache,
    check_batch_size,
    check_seqs,
    choice_texts,
    format_prompt,
    gold_index,
    pad_id,
    padded_batch,
)

TEMPLATES = ("letter", "cloze")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Formatted:
    """One record under a template: the prompt, per option the accepted answers (normalised) and the pair
    continuation, and the index of the right option."""

    prompt: str
    accepted: tuple  # tuple[tuple[str, ...], ...], lowercased and stripped
    continuations: tuple  # the text a contrastive pair appends for each option
    gold: int


def normalize(text: str) -> str:
    """The authors' normalisation: strip surrounding whitespace, lowercase."""
    return str(text).strip().lower()


def option_order(record: Mapping) -> list[int]:
    """The order in which the letter template lists a record's choices (seeded by the record id)."""
    n = len(record["choices"])
    order = list(range(n))
    random.Random(f"options:{record.get('id', '')}").shuffle(order)
    return order


def _letters(n: int) -> str:
    ls = list(LETTERS[:n])
    return ", ".join(ls[:-1]) + " or " + ls[-1]


def format_task(record: Mapping, kind: str, template: str = "letter") -> Formatted:
    """The prompt and the answers of one validated yes/no or choice record under ``template``."""
    if template not in TEMPLATES:
        raise EvaluationError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    if kind not in ("yesno", "mc"):
        raise EvaluationError(f"generated-answer scoring handles yes/no and choice records, not kind {kind!r}")
    gold = gold_index(record, kind)
    q = str(record["question"]).strip()
    if kind == "yesno":
        accepted = (("yes",), ("no",))
        if template == "cloze":
            return Formatted(format_prompt(record, kind), accepted, tuple(choice_texts(record, kind)), gold)
        prompt = f"Answer the question with 'yes' or 'no'.\n\nQuestion: {q}\n\nAnswer:"
        return Formatted(prompt, accepted, ("Yes", "No"), gold)
    choices = [str(c).strip() for c in record["choices"]]
    if len(choices) > len(LETTERS):
        raise EvaluationError(f"record {record.get('id', '?')!r} has {len(choices)} choices; the letter template "
                              f"handles at most {len(LETTERS)}")
    if template == "cloze":
        return Formatted(format_prompt(record, kind), tuple((normalize(c),) for c in choices),
                         tuple(choice_texts(record, kind)), gold)
    order = option_order(record)
    lines = [f"{LETTERS[i]}. {choices[j]}" for i, j in enumerate(order)]
    prompt = (f"Answer with the letter of the correct option ({_letters(len(order))}).\n\nQuestion: {q}\n"
              + "\n".join(lines) + "\nAnswer:")
    accepted = tuple((LETTERS[i].lower(), normalize(choices[j])) for i, j in enumerate(order))
    return Formatted(prompt, accepted, tuple(LETTERS[i] for i in range(len(order))), order.index(gold))


def match(continuation: str, accepted: Sequence[Sequence[str]]) -> int:
    """Index of the option whose accepted answers contain the normalised continuation; -1 (a non-answer) when
    none does, or when several options do."""
    c = normalize(continuation)
    hits = [i for i, acc in enumerate(accepted) if c in acc]
    return hits[0] if len(hits) == 1 else -1


def generate_continuations(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 1,
                           batch_size: int = 8, add_special_tokens: bool = True, progress: bool = False) -> list[str]:
    """Greedy continuations (decoded, special tokens skipped) of each prompt, ``batch_size`` prompts at a time,
    left-padded with an attention mask; prompts are tokenized as the scoring harness tokenizes them."""
    check_batch_size(batch_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise EvaluationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    cache = PromptCache(tokenizer, add_special_tokens)
    seqs = []
    for p in prompts:
        prefix, plain = cache.prompt(p)
        if not prefix + plain:
            raise EvaluationError(f"prompt {p[:60]!r} tokenizes to no tokens")
        seqs.append(prefix + plain)
    check_seqs(model, seqs)
    pad = pad_id(tokenizer)
    device = model_device(model)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out: list[str | None] = [None] * len(seqs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(seqs), desc="generating answers", unit="prompt", leave=False)
    eos = getattr(model.generation_config, "eos_token_id", None)
    try:
        with torch.no_grad():
            for s in range(0, len(order), batch_size):
                chunk = order[s:s + batch_size]
                ids, mask = padded_batch([seqs[i] for i in chunk], pad, left=True)
                width = ids.shape[1]
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                     top_k=None, pad_token_id=pad, eos_token_id=eos)
                for r, i in enumerate(chunk):
                    out[i] = tokenizer.decode(gen[r, width:].tolist(), skip_special_tokens=True)
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return out  # type: ignore[return-value]


def evaluate_generate(model, tokenizer, records: Sequence[Mapping], kind: str, *, template: str = "letter",
                      max_new_tokens: int = 1, batch_size: int = 8, progress: bool = True, name: str | None = None):
    """Accuracy by generated answer (module docstring) of validated ``records``; an
    :class:`~fusesteer.evaluate.tasks.EvalResult` with ``method="generate"`` and ``non_answers`` counted."""
    from .stats import wilson_ci
    fmt = [format_task(r, kind, template) for r in records]
    t0 = time.perf_counter()
    outs = generate_continuations(model, tokenizer, [f.prompt for f in fmt], max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, progress=progress)
    elapsed = time.perf_counter() - t0
    items = []
    for r, f, o in zip(records, fmt, outs):
        pred = match(o, f.accepted)
        items.append(ItemResult(id=str(r["id"]), gold=f.gold, pred=pred, correct=pred == f.gold, scores=[],
                                output=o, non_answer=pred < 0))
    n = len(items)
    k = sum(it.correct for it in items)
    lo, hi = wilson_ci(k, n)
    return EvalResult(kind=kind, method="generate", normalize=f"{template}/{max_new_tokens}tok", n=n, correct=k,
                      accuracy=k / n, ci_low=lo, ci_high=hi, elapsed_s=elapsed, items=items, name=name,
                      non_answers=sum(it.non_answer for it in items))
