"""Explanations and references: the enriched prompt's activations minus the question's."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from ...evaluate.grading import extract_answer
from ...runtime.backends.base import model_device
from ..capture import capture_span_mean
from .prompts import (
    EXPLAIN_PROMPT,
    FusionError,
    _check_unsteered,
    _clean_question,
    _encode,
    _special_ids,
    enriched_parts,
    question_prompt,
    truth_of,
)
from .runner import PromptRunner


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
    dev = model_device(model)
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
