"""The server's plan registry: named plans, loaded from a folder or uploaded, and per-request steering specs.

A registry entry is immutable once made (a new upload under a free name makes a new entry with a new
version number), so a request that resolved its plans keeps using them even if the entry is deleted
while it decodes. Requests name plans; :func:`parse_steering` turns the request's ``steering`` field into
a list of ``(entry, scale)`` and :func:`effective_plan` composes them into the one plan a batch row uses.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

from ..errors import PlanError
from ..runtime.plan import ModelSpec, SteeringPlan
from .protocol import show

log = logging.getLogger("fusesteer.serve")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # the whole name (fullmatch): no trailing newline
MAX_STEERING_ENTRIES = 8
MAX_ABS_SCALE = 1e4
DEFAULT_MAX_PLAN_BYTES = 64 * 1024 * 1024
# Entries per plan, and per request's composed steering: writing a plan into the table (between two forwards,
# while every stream waits) costs time in proportion to its entries (~0.1 ms each on SmolLM2, 1 CPU thread:
# 0.2 s at this limit; a 60k-entry plan stalled every stream for 12 s). 2048 covers all four sites of a
# 512-layer model.
DEFAULT_MAX_PLAN_ENTRIES = 2048
PLAN_SUFFIXES = (".safetensors", ".gguf")


class PlanTooLarge(PlanError):
    """A plan over the server's entry limit (answered with 413)."""


class SteeringSpecError(ValueError):
    """A request's ``steering`` field is malformed or names a plan that cannot be used (answered with 400)."""

    def __init__(self, message: str, param: str = "steering", code: str = "invalid_steering"):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class PlanRecord:
    name: str
    version: int
    plan: SteeringPlan | None  # None when the file could not be used with this model
    source: str  # "dir:<path>" or "upload"
    kind: str  # "fusesteer" or "gguf"
    error: str | None = None
    nbytes: int = 0

    def describe(self) -> dict:
        d: dict[str, Any] = {"name": self.name, "object": "steering.plan", "source": self.source,
                             "format": self.kind, "version": self.version}
        if self.plan is None:
            d.update(usable=False, error=self.error)
            return d
        p = self.plan
        d.update(usable=True, entries=len(p.entries), sites=sorted({e.site for e in p.entries}),
                 layers=sorted({e.layer for e in p.entries}),
                 fingerprint=p.spec.fingerprint() if p.spec else None, plan_name=p.name, bytes=self.nbytes)
        return d


def sniff_kind(data: bytes) -> str:
    """'gguf' for GGUF files (magic b'GGUF'), else 'fusesteer' (the safetensors loader checks the rest)."""
    return "gguf" if data[:4] == b"GGUF" else "fusesteer"


def peek_entries(data: bytes) -> int | None:
    """The number of entries a plan file declares, read from its header alone (no tensor is parsed), or None
    when the header cannot be read that way (the full loader then says what is wrong)."""
    try:
        if sniff_kind(data) == "gguf":  # magic, u32 version, u64 tensor count: one direction per layer
            return struct.unpack("<Q", data[8:16])[0]
        (hlen,) = struct.unpack("<Q", data[:8])
        if hlen > len(data) - 8:
            return None
        meta = json.loads(data[8:8 + hlen])["__metadata__"]["fusesteer"]
        return len(json.loads(meta)["entries"])
    except (struct.error, ValueError, KeyError, TypeError, RecursionError):
        return None


def plan_from_bytes(data: bytes, spec: ModelSpec, source: str) -> tuple[SteeringPlan, str]:
    """Parse a fusesteer .safetensors plan or a GGUF control vector from bytes and bind it to ``spec``.
    Raises PlanError (with the loader's specific message) for anything unusable."""
    kind = sniff_kind(data)
    if kind == "gguf":
        from ..interop.gguf_cv import read_control_vector

        # the GGUF reader memory-maps a path: write the bytes to a private temporary file first
        with tempfile.TemporaryDirectory(prefix="fusesteer-upload-") as d:
            path = os.path.join(d, "upload.gguf")
            with open(path, "wb") as f:
                f.write(data)
            plan = read_control_vector(path, spec)
        plan.metadata.get("files", [{}])[0]["path"] = source
        return plan, kind
    plan = SteeringPlan.from_bytes(data, source=source)
    plan.bind(spec)
    return plan, kind


class PlanRegistry:
    """Thread-safe name -> PlanRecord map."""

    def __init__(self, spec: ModelSpec, max_plan_bytes: int = DEFAULT_MAX_PLAN_BYTES, max_plans: int = 1024,
                 max_plan_entries: int = DEFAULT_MAX_PLAN_ENTRIES):
        self.spec = spec
        self.max_plan_bytes = int(max_plan_bytes)
        self.max_plan_entries = int(max_plan_entries)
        self.max_plans = int(max_plans)
        self._lock = threading.Lock()
        self._plans: dict[str, PlanRecord] = {}
        self._version = 0

    # ---- reading ---------------------------------------------------------------------------------
    def get(self, name: str) -> PlanRecord | None:
        with self._lock:
            return self._plans.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._plans)

    def list(self) -> list[dict]:
        with self._lock:
            recs = [self._plans[n] for n in sorted(self._plans)]
        return [r.describe() for r in recs]

    def __len__(self) -> int:
        with self._lock:
            return len(self._plans)

    # ---- writing ---------------------------------------------------------------------------------
    def _next_version(self) -> int:
        self._version += 1
        return self._version

    @staticmethod
    def check_name(name: Any) -> str:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise PlanError(f"plan name {show(name)} is invalid: use 1-64 characters from letters, digits, '.', '_' "
                            "and '-', starting with a letter or digit")
        return name

    def add_bytes(self, name: str, data: bytes, source: str = "upload", replace: bool = False) -> PlanRecord:
        """Validate and register a plan file's bytes. Raises PlanError (bad file / name), KeyError (name taken)."""
        self.check_name(name)
        if len(data) > self.max_plan_bytes:
            raise PlanError(f"plan file is {len(data)} bytes, over the server's {self.max_plan_bytes} byte limit")
        if not data:
            raise PlanError("plan file is empty")
        declared = peek_entries(data)  # refuse an oversized plan before paying for parsing it
        if declared is not None and declared > self.max_plan_entries:
            raise self._too_many(declared)
        plan, kind = plan_from_bytes(data, self.spec, source=f"{name} ({source})")
        if len(plan.entries) > self.max_plan_entries:
            raise self._too_many(len(plan.entries))
        with self._lock:
            if name in self._plans and not replace:
                raise KeyError(name)
            if name not in self._plans and len(self._plans) >= self.max_plans:
                raise PlanError(f"the registry already holds {len(self._plans)} plans (limit {self.max_plans}); "
                                "delete one first")
            rec = PlanRecord(name, self._next_version(), plan, source, kind, nbytes=len(data))
            self._plans[name] = rec
        log.info("plan %r registered from %s (%d entries)", name, source, len(plan.entries))
        return rec

    def _too_many(self, n: int) -> PlanError:
        return PlanTooLarge(f"the plan has {n} entries, over the server's limit of {self.max_plan_entries} entries "
                         "per plan (--max-plan-entries)")

    def delete(self, name: str) -> PlanRecord:
        with self._lock:
            return self._plans.pop(name)  # KeyError if absent

    def delete_version(self, name: str, version: int) -> PlanRecord | None:
        """Remove ``name`` only if it is still at ``version`` (a plan replaced since, e.g. by an upload, stays)."""
        with self._lock:
            rec = self._plans.get(name)
            if rec is None or rec.version != version:
                return None
            return self._plans.pop(name)

    def add_unusable(self, name: str, source: str, error: str) -> PlanRecord | None:
        """Record that the file for ``name`` cannot be used (listed with its reason; requests naming it get a 400),
        unless a usable plan holds the name: a bad file never replaces a good plan. None when nothing was recorded."""
        with self._lock:
            cur = self._plans.get(name)
            if (cur is not None and cur.plan is not None) or (cur is None and len(self._plans) >= self.max_plans):
                return None
            rec = PlanRecord(name, self._next_version(), None, source, sniff_kind(b""), error=error)
            self._plans[name] = rec
            return rec


# --------------------------------------------------------------------------------------------------
# per-request steering


@dataclass(frozen=True)
class Steering:
    """A resolved steering spec: ((record, scale), ...) composed in order. Empty = unsteered."""

    parts: tuple = field(default_factory=tuple)

    @property
    def key(self) -> str | None:
        """Identity of the effective plan (registry versions pin the exact plan files)."""
        if not self.parts:
            return None
        return "|".join(f"{r.name}#{r.version}@{s!r}" for r, s in self.parts)

    @property
    def label(self) -> str:
        """Human/metrics label: plan names joined with '+', or 'none'."""
        return "+".join(r.name for r, _ in self.parts) if self.parts else "none"


def _scale_of(v: Any, where: str) -> float:
    if v is None:
        return 1.0
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SteeringSpecError(f"{where}.scale must be a number, got {show(v)}", param=f"{where}.scale")
    try:
        s = float(v)
    except OverflowError:  # an integer too large for a float
        s = math.inf
    if not math.isfinite(s):
        raise SteeringSpecError(f"{where}.scale must be a finite number with |scale| <= {MAX_ABS_SCALE:g}, got "
                                f"{show(v)}", param=f"{where}.scale")
    if abs(s) > MAX_ABS_SCALE:
        raise SteeringSpecError(f"{where}.scale {s} is out of range (|scale| <= {MAX_ABS_SCALE:g})",
                                param=f"{where}.scale")
    return s


def parse_steering(raw: Any, registry: PlanRegistry) -> Steering:
    """The request's ``steering`` field -> Steering. Raises SteeringSpecError with the exact problem."""
    if raw is None:
        return Steering()
    if isinstance(raw, dict):
        items, single = [raw], True
    elif isinstance(raw, list):
        items, single = raw, False
    else:
        raise SteeringSpecError(f"steering must be an object {{\"plan\": NAME, \"scale\": S}} or a list of them, "
                                f"got {type(raw).__name__}")
    if len(items) > MAX_STEERING_ENTRIES:
        raise SteeringSpecError(f"steering has {len(items)} entries; at most {MAX_STEERING_ENTRIES} plans can be "
                                "composed in one request")
    parts = []
    for i, item in enumerate(items):
        where = "steering" if single else f"steering[{i}]"
        if not isinstance(item, dict):
            raise SteeringSpecError(f"{where} must be an object {{\"plan\": NAME, \"scale\": S}}, got "
                                    f"{type(item).__name__}", param=where)
        unknown = set(item) - {"plan", "scale"}
        if unknown:
            raise SteeringSpecError(f"{where} has unknown fields {show(sorted(map(str, unknown)))}; expected 'plan' "
                                    "and optional 'scale'", param=where)
        name = item.get("plan")
        if not isinstance(name, str) or not name:
            raise SteeringSpecError(f"{where}.plan must be a plan name (string), got {show(name)}",
                                    param=f"{where}.plan")
        rec = registry.get(name)
        if rec is None:
            known = registry.names()
            hint = f"; loaded plans: {', '.join(known[:20])}" if known else "; no plans are loaded"
            raise SteeringSpecError(f"unknown steering plan {show(name)}{hint}", param=f"{where}.plan",
                                    code="plan_not_found")
        if rec.plan is None:
            raise SteeringSpecError(f"steering plan {name!r} cannot be used with this model: {rec.error}",
                                    param=f"{where}.plan", code="plan_not_usable")
        parts.append((rec, _scale_of(item.get("scale"), where)))
    total = sum(len(rec.plan.entries) for rec, _ in parts)
    if total > registry.max_plan_entries:
        raise SteeringSpecError(f"the steering composes {total} plan entries, over the server's limit of "
                                f"{registry.max_plan_entries} (--max-plan-entries)")
    return Steering(tuple(parts))


def effective_plan(steering: Steering) -> SteeringPlan | None:
    """The composition (in order) of each part's plan scaled by its scale: (a, b) -> (1 + s(a - 1), s b)."""
    if not steering.parts:
        return None
    out = None
    for rec, s in steering.parts:
        p = rec.plan if s == 1.0 else rec.plan.scaled(s)
        if out is None:
            out = p.copy()
            out.name = steering.label
        else:
            out.extend(p)
    return out
