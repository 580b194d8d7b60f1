"""Evaluation datasets: the bundled JSONL files, loading, record validation, task kinds, splits."""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import FuseSteerError


class DatasetError(FuseSteerError, ValueError):
    """A dataset file or record is missing, malformed, or of the wrong kind."""



BUILTIN_DATASETS = {
    "strategyqa": "strategyqa.dev.jsonl",
    "truthfulqa_mc": "truthfulqa_mc.dev.jsonl",
    "cause_effect": "cause_effect.jsonl",
    "freshqa": "freshqa.dev.jsonl",
}

KINDS = ("yesno", "mc", "open")
SCORABLE_KINDS = ("yesno", "mc")
_YESNO = {"yes": "Yes", "no": "No"}
#: how the CLI names each kind
KIND_LABELS = {"yesno": "yes/no", "mc": "choice", "open": "open"}
#: which record kinds each CLI verb takes with --dataset (the one place this is decided)
VERB_KINDS = {
    "eval": SCORABLE_KINDS,
    "austeer": SCORABLE_KINDS,  # contrastive pairs need a wrong answer
    "baseline": SCORABLE_KINDS,
    "fusion": KINDS,  # references need a truth: the answer, the right choice or the reference answers
}


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------
def _builtin_path(name: str):
    return resources.files("fusesteer").joinpath("data", BUILTIN_DATASETS[name])


def _record_kind(rec: Mapping) -> str | None:
    if "choices" in rec or "answer_index" in rec:
        return "mc"
    if "answer" in rec:
        return "yesno"
    if "answers" in rec:
        return "open"
    return None


def validate_record(rec: Any, kind: str | None = None, where: str = "record") -> dict:
    """Check one record and return a normalised shallow copy (``answer`` → "Yes"/"No").

    ``kind`` None infers it from the fields present. Raises :class:`DatasetError` whose message
    starts with ``where`` (e.g. ``"data.jsonl line 3"``) and names the bad field.
    """
    if not isinstance(rec, Mapping):
        raise DatasetError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    rec = dict(rec)
    q = rec.get("question")
    if "question" not in rec:
        raise DatasetError(f"{where}: missing field 'question'")
    if not isinstance(q, str) or not q.strip():
        raise DatasetError(f"{where}: field 'question' must be a non-empty string, got {q!r:.80}")
    if "id" in rec and (isinstance(rec["id"], bool) or not isinstance(rec["id"], (str, int))):
        raise DatasetError(f"{where}: field 'id' must be a string, got {rec['id']!r:.80}")
    if "id" in rec:
        rec["id"] = str(rec["id"])

    found = _record_kind(rec)
    if kind is None:
        kind = found
        if kind is None:
            raise DatasetError(
                f"{where}: no answer field: expected 'answer' (Yes/No), 'choices' + 'answer_index', "
                f"or 'answers' (list of strings)"
            )
    elif kind not in KINDS:
        raise DatasetError(f"{where}: unknown task kind {kind!r}; expected one of {', '.join(KINDS)}")

    if kind == "yesno":
        if "answer" not in rec:
            raise DatasetError(f"{where}: missing field 'answer' (\"Yes\" or \"No\") for a yes/no record")
        a = rec["answer"]
        if not isinstance(a, str) or a.strip().lower() not in _YESNO:
            raise DatasetError(f"{where}: field 'answer' must be \"Yes\" or \"No\", got {a!r:.80}")
        rec["answer"] = _YESNO[a.strip().lower()]
    elif kind == "mc":
        if "choices" not in rec:
            raise DatasetError(f"{where}: missing field 'choices' for a multiple-choice record")
        ch = rec["choices"]
        if not isinstance(ch, list) or len(ch) < 2:
            raise DatasetError(f"{where}: field 'choices' must be a list of at least 2 strings, got {ch!r:.80}")
        for j, c in enumerate(ch):
            if not isinstance(c, str) or not c.strip():
                raise DatasetError(f"{where}: field 'choices'[{j}] must be a non-empty string, got {c!r:.80}")
        if "answer_index" not in rec:
            raise DatasetError(f"{where}: missing field 'answer_index' for a multiple-choice record")
        ai = rec["answer_index"]
        if isinstance(ai, bool) or not isinstance(ai, int) or not 0 <= ai < len(ch):
            raise DatasetError(
                f"{where}: field 'answer_index' must be an integer in [0, {len(ch) - 1}], got {ai!r:.80}"
            )
    else:  # open
        if "answers" not in rec:
            raise DatasetError(f"{where}: missing field 'answers' (list of reference answers)")
        ans = rec["answers"]
        if not isinstance(ans, list) or not ans or not all(isinstance(a, str) and a.strip() for a in ans):
            raise DatasetError(f"{where}: field 'answers' must be a non-empty list of non-empty strings")
    return rec


def bundled_kinds() -> dict[str, str]:
    """{bundled name: kind}, read from the first record of each file that ships with the package."""
    out = {}
    for name in BUILTIN_DATASETS:
        out[name] = "?"
        try:
            with _builtin_path(name).open(encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        out[name] = _record_kind(json.loads(line)) or "?"
                        break
        except (OSError, ValueError):  # pragma: no cover - broken install: load_dataset reports it
            pass
    return out


def _verbs_for(kind: str) -> list[str]:
    return [v for v, ks in VERB_KINDS.items() if kind in ks]


def dataset_help(verb: str) -> str:
    """``--dataset`` help for ``verb``, generated from the files that ship: each with its kind, and those of a
    kind the verb does not take with the verbs that do."""
    if verb not in VERB_KINDS:
        raise DatasetError(f"unknown verb {verb!r}; expected one of {', '.join(VERB_KINDS)}")
    kinds = bundled_kinds()
    ok = [f"{n} ({KIND_LABELS.get(k, k)})" for n, k in kinds.items() if k in VERB_KINDS[verb]]
    other = [f"{n} ({KIND_LABELS.get(k, k)}: {', '.join(_verbs_for(k)) or 'no verb'})"
             for n, k in kinds.items() if k not in VERB_KINDS[verb]]
    accepted = " or ".join(KIND_LABELS[k] for k in VERB_KINDS[verb])
    text = f"bundled dataset: {', '.join(ok)}; or a JSONL path ({accepted} records)"
    if other:
        text += f". Also bundled, for other verbs: {', '.join(other)}"
    return text


def check_kind_for(verb: str, kind: str, dataset: str) -> None:
    """Raise a :class:`DatasetError` that says which verbs take ``dataset`` when ``verb`` cannot use its kind."""
    if kind in VERB_KINDS.get(verb, KINDS):
        return
    label = KIND_LABELS.get(kind, kind)
    takes = " or ".join(KIND_LABELS[k] for k in VERB_KINDS[verb])
    fits = [n for n, k in bundled_kinds().items() if k in VERB_KINDS[verb]]
    raise DatasetError(f"{dataset} holds {label} records ({kind!r}); `fusesteer {verb}` takes {takes} datasets "
                       f"(bundled: {', '.join(fits)}); {label} datasets go to `fusesteer "
                       f"{' | '.join(_verbs_for(kind)) or '(none)'}`")


def load_dataset(name_or_path: str | Path, limit: int | None = None) -> list[dict]:
    """Load a JSONL task file: a bundled name (``strategyqa``, ``truthfulqa_mc``, ``cause_effect``,
    ``freshqa``) or a path. Returns the first ``limit`` records (all if None), validated.

    All records of a file must be of one kind; ids must be unique. Errors are :class:`DatasetError`
    naming the file, the line number and the field.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DatasetError(f"limit must be a non-negative integer or None, got {limit!r}")
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_DATASETS:
        res = _builtin_path(name_or_path)
        label = f"{name_or_path} ({BUILTIN_DATASETS[name_or_path]})"
        stem = name_or_path
        try:
            text = res.read_text(encoding="utf-8")
        except OSError as e:  # pragma: no cover - broken install
            raise DatasetError(f"bundled dataset {label} is missing from the installed package: {e}") from None
    else:
        if not isinstance(name_or_path, (str, Path)):
            raise DatasetError(f"dataset must be a name or a path, got {type(name_or_path).__name__}")
        path = Path(name_or_path)
        label = str(path)
        stem = path.name.split(".")[0] or "record"
        if not path.is_file():
            raise DatasetError(
                f"unknown dataset {str(name_or_path)!r}: not a bundled name "
                f"({', '.join(BUILTIN_DATASETS)}) and no such file"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"{label}: cannot read: {e}") from None

    records: list[dict] = []
    kind = None
    kind_line = 0
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if limit is not None and len(records) >= limit:
            break
        if not line.strip():
            continue
        where = f"{label} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        rec = validate_record(obj, None, where)
        k = _record_kind(rec)
        if kind is None:
            kind, kind_line = k, lineno
        elif k != kind:
            raise DatasetError(
                f"{where}: record is of kind {k!r} but line {kind_line} was {kind!r}; "
                f"a file must hold one kind of record"
            )
        rec.setdefault("id", f"{stem}-{lineno}")
        if rec["id"] in seen:
            raise DatasetError(f"{where}: field 'id' {rec['id']!r} duplicates line {seen[rec['id']]}")
        seen[rec["id"]] = lineno
        records.append(rec)
    if not records and limit != 0:
        raise DatasetError(f"{label}: no records")
    return records


def task_kind(records: Sequence[Mapping]) -> str:
    """``"yesno"`` (answer Yes/No), ``"mc"`` (choices + answer_index) or ``"open"`` (answers list).

    Raises :class:`DatasetError` for an empty list, unrecognised or mixed records.
    """
    if isinstance(records, Mapping) or not isinstance(records, Sequence) or isinstance(records, str):
        raise DatasetError("task_kind expects a list of records")
    if not records:
        raise DatasetError("task_kind: no records")
    kinds = set()
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise DatasetError(f"record {i}: expected a dict, got {type(r).__name__}")
        k = _record_kind(r)
        if k is None:
            raise DatasetError(
                f"record {i}: no answer field: expected 'answer' (Yes/No), 'choices' + 'answer_index', "
                f"or 'answers'"
            )
        kinds.add(k)
    if len(kinds) > 1:
        raise DatasetError(f"records mix task kinds {sorted(kinds)}")
    return kinds.pop()


def split(records: Sequence[Mapping], n_val: int, n_test: int | None, seed: int = 0) -> tuple[list, list]:
    """Deterministic disjoint validation/test split: shuffle indices with ``random.Random(seed)``,
    take the first ``n_val`` as validation and the next ``n_test`` (all the rest if None) as test.
    """
    n = len(records)
    for nm, v in (("n_val", n_val), ("n_test", n_test)):
        if v is None and nm == "n_test":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise DatasetError(f"split: {nm} must be a non-negative integer, got {v!r}")
    if n_test is None:
        n_test = max(n - n_val, 0)
    if n_val + n_test > n:
        raise DatasetError(f"split: n_val + n_test = {n_val + n_test} exceeds the {n} records")
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    val = [records[i] for i in idx[:n_val]]
    test = [records[i] for i in idx[n_val : n_val + n_test]]
    return val, test
