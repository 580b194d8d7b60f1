"""Records, prompts and the errors of Fusion Steering."""

from __future__ import annotations

from typing import Mapping

from ...errors import FuseSteerError


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


def _encode(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def _special_ids(tokenizer) -> set[int]:
    return {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
