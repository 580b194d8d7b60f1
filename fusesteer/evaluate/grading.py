"""Grading of open-ended answers: token overlap, a pluggable judge, a composite score, SimpleQA grades.

Everything here is deterministic unless an HF model judge is used (and that one decodes greedily).

**Answer extraction** (:func:`extract_answer`). Generations are continuations of
``"Question: …\\nAnswer:"``; the answer is the text up to the first line break (after leading
whitespace), also cut before an echoed ``"Question:"``, then stripped.

**Token overlap** (:func:`token_f1`, :func:`token_overlap`). SQuAD-style: both strings are
normalised by :func:`normalize_answer` (lower case, punctuation removed, the articles *a / an / the*
removed, whitespace collapsed), split on whitespace, and scored by the F1 of the bag-of-words
intersection (precision = shared / answer tokens, recall = shared / truth tokens). Two empty strings
score 1, one empty string scores 0. Against several references the overlap is the maximum F1.

**Judge** (:class:`RuleJudge`, :class:`HFJudge`). A judge returns three scores in [0, 1] —
factual accuracy, coherence, relevance — and their mix
``judge = 0.5·factual + 0.25·coherence + 0.25·relevance`` (:data:`JUDGE_WEIGHTS`).

The default :class:`RuleJudge` is a lexical proxy (it cannot see negation or paraphrase):

* *factual*: for yes/no truths, 1 if the first "yes"/"no" word of the answer matches the truth, else
  0; otherwise the best, over the references, share of the reference's content words (normalised
  tokens minus a small stop-word list) that occur in the answer (recall).
* *coherence*: 0 for an empty answer; else distinct-bigram ratio × (0.5 if some token repeats 3 or
  more times in a row, else 1) × share of whitespace-separated words holding a letter or digit.
* *relevance*: 0 for an empty answer; else ``max(factual, min(1, 2·q))`` where q is the share of
  the question's content words present in the answer (an answer naming the truth is relevant even
  if it does not echo the question).

:class:`HFJudge` prompts a local causal LM for three integer scores from 1 to 10 and maps each to
``(s − 1) / 9``. Its output is parsed by :func:`parse_judge_scores` (``factual=7 coherence=8
relevance=9`` style, or else exactly three integers in 1..10 in that order); when parsing fails the
judge falls back to the rule judge (``on_failure="rule"``, default, flagged ``parse_failed=True``),
to zeros (``"zero"``), or raises (``"raise"``).

**Composite** (:func:`grade`): ``composite = 0.5·overlap + 0.5·judge`` (:data:`COMPOSITE_WEIGHTS`);
``accurate = composite ≥ 0.6`` (:data:`ACCURATE_THRESHOLD`, the paper's threshold).

**SimpleQA grade** (:func:`simpleqa_grade`): ``CORRECT`` / ``INCORRECT`` / ``NOT_ATTEMPTED``.

* empty answer → NOT_ATTEMPTED.
* yes/no truths: the first yes/no word matching → CORRECT, the opposite → INCORRECT, none →
  NOT_ATTEMPTED.
* otherwise CORRECT when, for some reference, every number in the reference appears in the answer and
  the answer holds all of its content words (references of ≤ 3 content words) or at least 2/3 of them
  (longer references); a hedged answer that still states the truth is CORRECT, as in SimpleQA.
* else NOT_ATTEMPTED when the answer hedges or refuses ("I don't know", "I'm not sure",
  "cannot answer", "no information", "as an AI", …; see :data:`HEDGES`), INCORRECT otherwise.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, Sequence

from ..errors import FuseSteerError
from ..runtime.compat import output_cache, with_cache

__all__ = [
    "GradingError", "JUDGE_WEIGHTS", "COMPOSITE_WEIGHTS", "ACCURATE_THRESHOLD", "SIMPLEQA_GRADES", "HEDGES",
    "extract_answer", "normalize_answer", "answer_tokens", "content_tokens", "token_f1", "token_overlap",
    "JudgeScores", "Judge", "RuleJudge", "HFJudge", "parse_judge_scores", "is_hedge", "simpleqa_grade",
    "Grade", "grade", "summarize",
]


class GradingError(FuseSteerError, ValueError):
    """Bad input to a grading function or judge."""


JUDGE_WEIGHTS = {"factual": 0.5, "coherence": 0.25, "relevance": 0.25}
COMPOSITE_WEIGHTS = {"overlap": 0.5, "judge": 0.5}
ACCURATE_THRESHOLD = 0.6
SIMPLEQA_GRADES = ("CORRECT", "INCORRECT", "NOT_ATTEMPTED")

STOPWORDS = frozenset("""
a an the and or but if of to in on at by for with from as is are was were be been being am do does did
has have had it its this that these those there here he she they them his her their we us our you your i me
my what which who whom whose when where why how than then so such not no yes into about over after before
up down out off very can could would should will shall may might must also just only
""".split()) - {"not", "no", "yes"}

HEDGES = (
    "i don't know", "i do not know", "i dont know", "don't know", "do not know", "not sure", "unsure",
    "i cannot answer", "i can't answer", "cannot answer", "can't answer", "unable to answer", "unable to",
    "i cannot", "i can't", "not able to", "no information", "don't have information",
    "do not have information", "don't have access", "do not have access", "i'm sorry", "i am sorry",
    "as an ai", "as a language model", "cannot be determined", "can't be determined", "no idea",
    "not known", "unknown", "i don't have", "i do not have", "cannot provide", "can't provide",
    "not possible to know", "i'm not certain", "i am not certain",
)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_NUM = re.compile(r"^\d+(?:[.,]\d+)*$")


# --------------------------------------------------------------------------------------------
# Text normalisation and overlap
# --------------------------------------------------------------------------------------------
def _check_str(x, what: str) -> str:
    if not isinstance(x, str):
        raise GradingError(f"{what} must be a string, got {type(x).__name__}")
    return x


def _check_truths(truths) -> list[str]:
    if isinstance(truths, str):
        truths = [truths]
    if not isinstance(truths, Sequence) or not truths:
        raise GradingError("truths must be a non-empty list of reference strings")
    for i, t in enumerate(truths):
        if not isinstance(t, str):
            raise GradingError(f"truths[{i}] must be a string, got {type(t).__name__}")
    return list(truths)


def extract_answer(text: str) -> str:
    """The answer part of a generated continuation: up to the first line break, before any echoed
    ``"Question:"``, stripped."""
    text = _check_str(text, "text").lstrip()
    text = text.split("\n", 1)[0]
    cut = text.find("Question:")
    if cut >= 0:
        text = text[:cut]
    return text.strip()


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, delete punctuation characters (ASCII and Unicode P*, so
    "U.S." → "us", "1,000" → "1000"), drop a/an/the, collapse whitespace."""
    s = _check_str(s, "answer").lower()
    s = "".join(ch for ch in s if not (ch in _PUNCT or unicodedata.category(ch).startswith("P")))
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def answer_tokens(s: str) -> list[str]:
    return normalize_answer(s).split()


def content_tokens(s: str) -> list[str]:
    """Normalised tokens without stop words (all tokens if every one is a stop word)."""
    toks = answer_tokens(s)
    kept = [t for t in toks if t not in STOPWORDS]
    return kept or toks


def token_f1(prediction: str, truth: str) -> float:
    """SQuAD token F1 between two strings (see the module docstring)."""
    p, t = answer_tokens(prediction), answer_tokens(truth)
    if not p or not t:
        return float(p == t)
    same = sum((Counter(p) & Counter(t)).values())
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(t)
    return 2 * prec * rec / (prec + rec)


def token_overlap(answer: str, truths) -> float:
    """Max token F1 of ``answer`` against one or several references."""
    truths = _check_truths(truths)
    return max(token_f1(answer, t) for t in truths)


def _yesno(s: str) -> str | None:
    for t in answer_tokens(s):
        if t in ("yes", "no"):
            return t
    return None


def _yesno_truths(truths: Sequence[str]) -> str | None:
    vals = {normalize_answer(t) for t in truths}
    if len(vals) == 1 and next(iter(vals)) in ("yes", "no"):
        return next(iter(vals))
    return None


def _recall(truth: str, answer_set: set[str]) -> float:
    ct = set(content_tokens(truth))
    if not ct:
        return 0.0
    return len(ct & answer_set) / len(ct)


# --------------------------------------------------------------------------------------------
# Judges
# --------------------------------------------------------------------------------------------
@dataclass
class JudgeScores:
    """Three scores in [0, 1] and their weighted mix ``judge``."""

    factual: float
    coherence: float
    relevance: float
    source: str = "rule"
    parse_failed: bool = False
    raw: str | None = None

    @property
    def judge(self) -> float:
        w = JUDGE_WEIGHTS
        return w["factual"] * self.factual + w["coherence"] * self.coherence + w["relevance"] * self.relevance

    def to_dict(self) -> dict:
        d = asdict(self)
        d["judge"] = self.judge
        return d


class Judge(Protocol):
    """Anything with ``score(question, answer, truths) -> JudgeScores``."""

    def score(self, question: str, answer: str, truths: Sequence[str]) -> JudgeScores: ...


def _coherence(answer: str) -> float:
    words = answer.split()
    if not words:
        return 0.0
    toks = answer_tokens(answer)
    if len(toks) >= 2:
        bigrams = list(zip(toks, toks[1:]))
        distinct = len(set(bigrams)) / len(bigrams)
    else:
        distinct = 1.0
    run, best = 1, 1
    for a, b in zip(toks, toks[1:]):
        run = run + 1 if a == b else 1
        best = max(best, run)
    run_factor = 0.5 if best >= 3 else 1.0
    alnum = sum(any(ch.isalnum() for ch in w) for w in words) / len(words)
    return distinct * run_factor * alnum


class RuleJudge:
    """The deterministic default judge (see the module docstring for the exact rules)."""

    name = "rule"

    def score(self, question: str, answer: str, truths) -> JudgeScores:
        _check_str(question, "question")
        _check_str(answer, "answer")
        truths = _check_truths(truths)
        if not answer.strip():
            return JudgeScores(0.0, 0.0, 0.0, source=self.name)
        yn = _yesno_truths(truths)
        aset = set(answer_tokens(answer))
        if yn is not None:
            factual = 1.0 if _yesno(answer) == yn else 0.0
        else:
            factual = max(_recall(t, aset) for t in truths)
        coherence = _coherence(answer)
        qc = set(content_tokens(question))
        q = len(qc & aset) / len(qc) if qc else 1.0
        relevance = max(factual, min(1.0, 2.0 * q))
        return JudgeScores(factual, coherence, relevance, source=self.name)


_NAMED = {
    "factual": re.compile(r"factual(?:\s+accuracy)?\s*(?:score)?\s*[:=\-]?\s*(\d{1,2})\b", re.I),
    "coherence": re.compile(r"coheren(?:ce|t)\s*(?:score)?\s*[:=\-]?\s*(\d{1,2})\b", re.I),
    "relevance": re.compile(r"relevan(?:ce|t)\s*(?:score)?\s*[:=\-]?\s*(\d{1,2})\b", re.I),
}


def parse_judge_scores(text: str) -> tuple[int, int, int] | None:
    """Parse (factual, coherence, relevance) integer scores in 1..10 from a judge's output, or None.

    Accepts ``factual: 7, coherence=8, relevance 9`` (any order, "factual accuracy" allowed) or, failing
    that, a text holding exactly three integers, all in 1..10, taken in that order.
    """
    _check_str(text, "judge output")
    named = {}
    for k, rx in _NAMED.items():
        m = rx.search(text)
        if m:
            named[k] = int(m.group(1))
    if len(named) == 3:
        vals = (named["factual"], named["coherence"], named["relevance"])
        return vals if all(1 <= v <= 10 for v in vals) else None
    nums = [int(x) for x in re.findall(r"(?<![\d.])\d{1,3}(?![\d.])", text)]
    if len(nums) == 3 and all(1 <= v <= 10 for v in nums):
        return nums[0], nums[1], nums[2]
    return None


JUDGE_PROMPT = (
    "You are grading an answer to a question against a reference answer.\n"
    "Question: {question}\n"
    "Reference answer: {truth}\n"
    "Candidate answer: {answer}\n"
    "Rate the candidate from 1 (worst) to 10 (best) for factual accuracy (agreement with the reference), "
    "coherence (fluent, non-repetitive) and relevance (addresses the question).\n"
    "Reply exactly as: factual=<1-10> coherence=<1-10> relevance=<1-10>\n"
)


class HFJudge:
    """A local Hugging Face causal LM as judge (greedy decoding, bounded output).

    ``model``: a local model folder / known name for :func:`fusesteer.models.load`, or an already loaded
    model (then pass ``tokenizer``). ``on_failure``: "rule" (fall back to :class:`RuleJudge`, flagged
    ``parse_failed``), "zero" (all scores 0, flagged) or "raise" (:class:`GradingError`).
    """

    name = "hf"

    def __init__(self, model, tokenizer=None, *, max_new_tokens: int = 32, on_failure: str = "rule",
                 prompt: str = JUDGE_PROMPT, chat_template: bool | None = None):
        if on_failure not in ("rule", "zero", "raise"):
            raise GradingError(f"on_failure must be 'rule', 'zero' or 'raise', got {on_failure!r}")
        if isinstance(model, (str, Path)):
            from ..models import load

            model, tokenizer = load(model, progress=False)
        if tokenizer is None:
            raise GradingError("HFJudge: pass the tokenizer together with a loaded model")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise GradingError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens = max_new_tokens
        self.on_failure = on_failure
        self.prompt = prompt
        if chat_template is None:
            chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.chat_template = chat_template
        self._rule = RuleJudge()

    def _generate(self, text: str) -> str:
        import torch

        tok = self.tokenizer
        if self.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
            enc = tok(text, return_tensors="pt", add_special_tokens=False)
        else:
            enc = tok(text, return_tensors="pt")
        dev = self.model.get_input_embeddings().weight.device
        ids = enc["input_ids"].to(dev)
        eos = {i for i in (tok.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None))
               if isinstance(i, int)}
        out: list[int] = []
        past = None
        x = ids
        with torch.inference_mode():
            for _ in range(self.max_new_tokens):
                o = self.model(input_ids=x, use_cache=True, logits_to_keep=1, **with_cache(self.model, past))
                past = output_cache(o)
                nxt = int(o.logits[0, -1].argmax())
                if nxt in eos:
                    break
                out.append(nxt)
                x = torch.tensor([[nxt]], device=dev)
        return tok.decode(out, skip_special_tokens=True)

    def score(self, question: str, answer: str, truths) -> JudgeScores:
        _check_str(question, "question")
        _check_str(answer, "answer")
        truths = _check_truths(truths)
        raw = self._generate(self.prompt.format(question=question, truth=truths[0], answer=answer))
        parsed = parse_judge_scores(raw)
        if parsed is not None:
            f, c, r = ((v - 1) / 9 for v in parsed)
            return JudgeScores(f, c, r, source=self.name, raw=raw)
        if self.on_failure == "raise":
            raise GradingError(f"judge output could not be parsed into three 1-10 scores: {raw[:200]!r}")
        if self.on_failure == "zero":
            return JudgeScores(0.0, 0.0, 0.0, source=self.name, parse_failed=True, raw=raw)
        s = self._rule.score(question, answer, truths)
        return JudgeScores(s.factual, s.coherence, s.relevance, source="rule (hf parse failed)",
                           parse_failed=True, raw=raw)


# --------------------------------------------------------------------------------------------
# SimpleQA grade
# --------------------------------------------------------------------------------------------
def is_hedge(answer: str) -> bool:
    """True if the answer hedges or refuses (see :data:`HEDGES`)."""
    s = _check_str(answer, "answer").lower().replace("\u2019", "'").replace("\u2018", "'")
    s = " ".join(s.split())
    return any(h in s for h in HEDGES)


def _numbers(tokens: Sequence[str]) -> set[str]:
    return {t.replace(",", "") for t in tokens if _NUM.match(t)}


def simpleqa_grade(answer: str, truths) -> str:
    """``"CORRECT"``, ``"INCORRECT"`` or ``"NOT_ATTEMPTED"`` (rules in the module docstring)."""
    _check_str(answer, "answer")
    truths = _check_truths(truths)
    if not answer.strip() or not answer_tokens(answer):
        return "NOT_ATTEMPTED"
    yn = _yesno_truths(truths)
    if yn is not None:
        got = _yesno(answer)
        if got is None:
            return "NOT_ATTEMPTED"
        return "CORRECT" if got == yn else "INCORRECT"
    atoks = answer_tokens(answer)
    aset = set(atoks)
    anums = _numbers(atoks)
    for t in truths:
        ct = content_tokens(t)
        if not ct:
            continue
        if not _numbers(answer_tokens(t)) <= anums:
            continue
        rec = len(set(ct) & aset) / len(set(ct))
        need = 1.0 if len(set(ct)) <= 3 else 2.0 / 3.0
        if rec >= need - 1e-12:
            return "CORRECT"
    return "NOT_ATTEMPTED" if is_hedge(answer) else "INCORRECT"


# --------------------------------------------------------------------------------------------
# One grade and summaries
# --------------------------------------------------------------------------------------------
@dataclass
class Grade:
    answer: str
    overlap: float
    factual: float
    coherence: float
    relevance: float
    judge: float
    composite: float
    accurate: bool
    simpleqa: str
    judge_source: str = "rule"
    parse_failed: bool = False
    judge_raw: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def grade(question: str, answer: str, truths, judge: Judge | None = None) -> Grade:
    """Grade one (already extracted) answer: overlap, judge scores, composite, accurate, SimpleQA."""
    truths = _check_truths(truths)
    judge = judge or RuleJudge()
    ov = token_overlap(answer, truths)
    s = judge.score(question, answer, truths)
    for k in ("factual", "coherence", "relevance"):
        v = getattr(s, k)
        if not 0.0 <= v <= 1.0:
            raise GradingError(f"judge returned {k}={v!r}; scores must lie in [0, 1]")
    comp = COMPOSITE_WEIGHTS["overlap"] * ov + COMPOSITE_WEIGHTS["judge"] * s.judge
    return Grade(answer=answer, overlap=ov, factual=s.factual, coherence=s.coherence, relevance=s.relevance,
                 judge=s.judge, composite=comp, accurate=comp >= ACCURATE_THRESHOLD - 1e-12,
                 simpleqa=simpleqa_grade(answer, truths), judge_source=s.source, parse_failed=s.parse_failed,
                 judge_raw=s.raw)


def summarize(grades: Sequence[Grade]) -> dict:
    """Accuracy (composite ≥ 0.6) with a Wilson 95% CI, mean scores, SimpleQA counts and rates."""
    from .stats import wilson_ci

    n = len(grades)
    if n == 0:
        return {"n": 0}
    k = sum(g.accurate for g in grades)
    lo, hi = wilson_ci(k, n)
    counts = {c: sum(g.simpleqa == c for g in grades) for c in SIMPLEQA_GRADES}
    mean = lambda attr: sum(getattr(g, attr) for g in grades) / n  # noqa: E731
    return {
        "n": n, "accurate": k, "accuracy": k / n, "accuracy_ci": [lo, hi],
        "mean_composite": mean("composite"), "mean_overlap": mean("overlap"), "mean_judge": mean("judge"),
        "mean_factual": mean("factual"), "mean_coherence": mean("coherence"), "mean_relevance": mean("relevance"),
        "simpleqa": counts, "simpleqa_rate": {c: counts[c] / n for c in SIMPLEQA_GRADES},
        "judge_parse_failures": sum(g.parse_failed for g in grades),
    }
