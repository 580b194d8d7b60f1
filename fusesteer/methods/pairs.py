"""Contrastive pairs for steering methods, built from yes/no and multiple-choice task records.

The general recipe of the AUSteer paper (appendix B.1): the *positive* sample is the question followed by
the correct answer, the *negative* sample is the same question followed by a wrong answer (for yes/no
tasks: the opposite answer; for multiple choice: a wrong choice drawn at random with a seeded RNG, or
every wrong choice with ``negatives="all"``). The paper's optional nearest-wrong-answer selection with a
sentence encoder is not implemented (it would need a second model; random wrong answers are the recipe
the paper uses for commonsense tasks).

Prompts and answer texts come from the evaluation harness (:func:`fusesteer.evaluate.tasks.format_prompt`,
:func:`~fusesteer.evaluate.tasks.choice_texts`), so a pair's positive text is exactly the sequence the
harness scores for the right choice, and tokenization (:func:`pair_token_ids`) goes through the harness's
:func:`~fusesteer.evaluate.tasks.encode_continuation`.

Pairs files are JSONL, one object a line: ``{"id": ..., "prompt": ..., "positive": ..., "negative": ...}``
where ``positive``/``negative`` are the continuations appended to ``prompt`` (include the leading space).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import FuseSteerError
from ..evaluate import tasks
from ..evaluate.generate import format_task

__all__ = ["PairsError", "ContrastivePair", "make_pairs", "save_pairs", "load_pairs", "pair_token_ids",
           "NEGATIVE_MODES"]

NEGATIVE_MODES = ("random", "all")


class PairsError(FuseSteerError, ValueError):
    """Contrastive pairs could not be built or read."""


@dataclass(frozen=True)
class ContrastivePair:
    """``prompt + positive`` (right answer) vs ``prompt + negative`` (wrong answer)."""

    id: str
    prompt: str
    positive: str
    negative: str

    @property
    def positive_text(self) -> str:
        return self.prompt + self.positive

    @property
    def negative_text(self) -> str:
        return self.prompt + self.negative

    def to_dict(self) -> dict:
        return asdict(self)


def make_pairs(records: Sequence[Mapping], kind: str | None = None, *, negatives: str = "random", seed: int = 0,
               limit: int | None = None, chat_template: bool = False, tokenizer=None,
               template: str = "cloze") -> list[ContrastivePair]:
    """Contrastive pairs from yes/no or multiple-choice records (one pair per record with
    ``negatives="random"``; one per wrong choice with ``negatives="all"``).

    The wrong choice of record ``i`` is drawn with ``random.Random(f"{seed}:{id}")``, so a record's pair
    does not depend on which other records are in the list. ``limit`` caps the number of pairs returned.
    ``chat_template`` wraps the prompt in the tokenizer's chat template, as ``evaluate(chat_template=True)``.

    ``template="letter"`` builds the AUSteer authors' pairs (the official protocol): the options listed in the
    prompt (:func:`fusesteer.evaluate.generate.format_task`) and the answer token appended without a space —
    ``prompt + "A"`` vs ``prompt + "C"``, ``prompt + "Yes"`` vs ``prompt + "No"``.
    """
    if negatives not in NEGATIVE_MODES:
        raise PairsError(f"negatives must be one of {', '.join(NEGATIVE_MODES)}, got {negatives!r}")
    if template not in ("cloze", "letter"):
        raise PairsError(f"template must be 'cloze' or 'letter', got {template!r}")
    if template == "letter" and chat_template:
        raise PairsError("the letter template is the authors' plain prompt; it does not take chat_template")
    if isinstance(records, Mapping) or not isinstance(records, Sequence) or not records:
        raise PairsError("make_pairs needs a non-empty list of task records")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise PairsError(f"limit must be a positive integer or None, got {limit!r}")
    if kind is None:
        kind = tasks.task_kind(records)
    if kind not in ("yesno", "mc"):
        raise PairsError(f"contrastive pairs need yes/no or multiple-choice records, got kind {kind!r} "
                         f"(open-ended records have no wrong answer to contrast with)")
    out: list[ContrastivePair] = []
    for i, raw in enumerate(records):
        rec = tasks.validate_record(raw, kind, f"record {i}")
        rid = str(rec.get("id", i))
        rec.setdefault("id", rid)
        if template == "letter":
            f = format_task(rec, kind, "letter")
            prompt, choices, gold = f.prompt, list(f.continuations), f.gold
        else:
            prompt = tasks.format_prompt(rec, kind, tokenizer=tokenizer, chat_template=chat_template)
            choices = tasks.choice_texts(rec, kind, chat_template=chat_template)
            gold = tasks.gold_index(rec, kind)
        wrong = [j for j in range(len(choices)) if j != gold and choices[j] != choices[gold]]
        if not wrong:
            raise PairsError(f"record {rid!r}: every choice equals the right answer; no negative to build")
        if negatives == "random":
            picks = [random.Random(f"{seed}:{rid}").choice(wrong)]
        else:
            picks = wrong
        for j in picks:
            pid = rid if negatives == "random" else f"{rid}#{j}"
            out.append(ContrastivePair(pid, prompt, choices[gold], choices[j]))
            if limit is not None and len(out) >= limit:
                return out
    return out


def save_pairs(pairs: Sequence[ContrastivePair], path: str | Path) -> None:
    """Write pairs as JSONL (see the module docstring for the format)."""
    with open(path, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")


def load_pairs(path: str | Path, limit: int | None = None) -> list[ContrastivePair]:
    """Read a JSONL pairs file: objects with string fields ``prompt``, ``positive``, ``negative`` (and an
    optional ``id``). Errors name the line and the field."""
    p = Path(path)
    if not p.is_file():
        raise PairsError(f"pairs file {str(path)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PairsError(f"{path}: cannot read: {e}") from None
    out: list[ContrastivePair] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if limit is not None and len(out) >= limit:
            break
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PairsError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise PairsError(f"{where}: expected a JSON object with prompt, positive, negative")
        for key in ("prompt", "positive", "negative"):
            v = obj.get(key)
            if not isinstance(v, str) or not v:
                raise PairsError(f"{where}: field {key!r} must be a non-empty string, got {v!r:.60}")
        if obj["positive"] == obj["negative"]:
            raise PairsError(f"{where}: positive and negative are the same text")
        pid = obj.get("id", f"{p.name.split('.')[0]}-{lineno}")
        out.append(ContrastivePair(str(pid), obj["prompt"], obj["positive"], obj["negative"]))
    if not out:
        raise PairsError(f"{path}: no pairs")
    return out


def pair_token_ids(tokenizer, pair: ContrastivePair, add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of the positive and negative sequences, tokenized exactly as the evaluation harness
    tokenizes ``prompt + choice`` (:func:`fusesteer.evaluate.tasks.encode_continuation`)."""
    pp, pc = tasks.encode_continuation(tokenizer, pair.prompt, pair.positive, add_special_tokens=add_special_tokens)
    np_, nc = tasks.encode_continuation(tokenizer, pair.prompt, pair.negative, add_special_tokens=add_special_tokens)
    return pp + pc, np_ + nc


def right_padded(seqs, pad: int):
    """(ids, attention_mask) int64 [len(seqs), longest]: the token id lists left-aligned, padded with ``pad``."""
    return tasks.padded_batch(seqs, pad)
