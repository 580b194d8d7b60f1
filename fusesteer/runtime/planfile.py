"""The plan file format: safetensors tensors + a JSON header in the safetensors metadata (never pickle).

Writing is atomic and refuses what would not load again; reading is data-only and bounded (header size, entry
count, file size, metadata depth), parses the safetensors container itself, checks every field, the checksum
over header + tensors, and the model fingerprint. :class:`~.plan.SteeringPlan`'s ``save`` / ``load`` /
``from_bytes`` / ``header`` call into here; a plan is read into a :class:`PlanRecord` (this module does not
know the plan class).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..errors import PlanError
from .ir import F32_MAX, MAX_ENTRIES, ModelSpec, PlanEntry

FORMAT_NAME = "fusesteer-plan"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_FILE_BYTES = 4 * 1024 * 1024 * 1024
MAX_METADATA_DEPTH = 64


def plan_header(plan) -> dict:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model": plan.spec.to_dict() if plan.spec else None,
        "fingerprint": plan.spec.fingerprint() if plan.spec else None,
        "name": plan.name,
        "notes": plan.notes,
        "metadata": plan.metadata,
        "entries": [],
    }

def check_header(plan) -> None:
    """What save() writes must load again: name and notes strings (or None), metadata of JSON values
    (str keys; None, bools, ints, finite floats, strings, lists, dicts), valid entries."""
    for key in ("name", "notes"):
        v = getattr(plan, key)
        if v is not None and not isinstance(v, str):
            raise PlanError(f"plan.{key} must be a string or None, got {type(v).__name__} {v!r}")
    if not isinstance(plan.metadata, dict):
        raise PlanError(f"plan.metadata must be a dict, got {type(plan.metadata).__name__}")
    _check_json(plan.metadata, "plan.metadata", 0)
    if plan.spec is not None and not isinstance(plan.spec, ModelSpec):
        raise PlanError(f"plan.spec must be a ModelSpec or None, got {type(plan.spec).__name__}")
    if len(plan.entries) > MAX_ENTRIES:
        raise PlanError(f"plan has {len(plan.entries)} entries (limit {MAX_ENTRIES})")
    for i, e in enumerate(plan.entries):
        if not isinstance(e, PlanEntry):
            raise PlanError(f"plan.entries[{i}] must be a PlanEntry, got {type(e).__name__}")
    plan.validate()


def _serialized(plan) -> tuple[dict, str]:
    """(tensors, header JSON) of a plan that will load again (PlanError otherwise)."""
    check_header(plan)
    header = plan_header(plan)
    tensors: dict[str, torch.Tensor] = {}
    for i, e in enumerate(plan.entries):
        rec: dict[str, Any] = {"layer": e.layer, "site": e.site, "gating": e.gating}
        for what, t in (("a", e.a), ("b", e.b), ("dims", e.dims)):
            if t is None:
                rec[what] = None
            elif t.dim() == 0 and what != "dims":
                rec[what] = {"scalar": float(t)}
            else:
                key = f"entries.{i}.{what}"
                tensors[key] = t.contiguous()
                rec[what] = {"tensor": key}
        header["entries"].append(rec)
    header["checksum"] = plan_checksum(header, tensors)
    meta_json = json.dumps(header, allow_nan=False)
    if len(meta_json.encode()) + 1024 > MAX_HEADER_BYTES:
        raise PlanError(f"the plan header would be {len(meta_json.encode())} bytes, more than the "
                        f"{MAX_HEADER_BYTES} byte limit the loader accepts (large metadata?)")
    return tensors, meta_json


def plan_bytes(plan) -> bytes:
    """The bytes of the plan file ``save`` would write."""
    from safetensors.torch import save

    tensors, meta_json = _serialized(plan)
    return save(tensors, metadata={"fusesteer": meta_json})


def save_plan(plan, path: str | os.PathLike) -> None:
    """Write the plan (safetensors + JSON header) atomically; a plan that would not load again, or a path
    that cannot be written, raises PlanError and leaves no file behind."""
    from safetensors.torch import save_file

    tensors, meta_json = _serialized(plan)
    path = _path_arg(path, "save")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise PlanError(f"cannot write plan file {path!r}: it is a directory")
    if not os.path.isdir(folder):
        raise PlanError(f"cannot write plan file {path!r}: the folder {folder!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"fusesteer": meta_json})
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - OSError, SafetensorError: one clear message, no file left
        raise PlanError(f"cannot write plan file {path!r}: {type(e).__name__}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass
class PlanRecord:
    """What a plan file holds, checked: the fields of a :class:`~.plan.SteeringPlan`."""

    spec: ModelSpec | None
    name: str | None
    notes: str | None
    metadata: dict
    entries: list[PlanEntry] = field(default_factory=list)


def load_plan(path: str | os.PathLike) -> PlanRecord:
    path = _path_arg(path, "load")
    if os.path.isdir(path):
        raise PlanError(f"cannot read plan file {path!r}: it is a directory")
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise PlanError(f"{path}: file is {size} bytes, larger than the {MAX_FILE_BYTES} byte limit")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PlanError(f"cannot read plan file {path!r}: {e.strerror or e}") from None
    return plan_from_bytes(data, source=path)

def plan_from_bytes(data: bytes, source: str = "<bytes>") -> PlanRecord:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PlanError(f"SteeringPlan.from_bytes() expects the bytes of a plan file, got {type(data).__name__}"
                        + (" (read the file in binary mode, or use SteeringPlan.load(path))"
                           if isinstance(data, str) else ""))
    data = bytes(data)
    header, tensors = _read_safetensors(data, source)
    return _plan_from_header(header, tensors, source)


# --------------------------------------------------------------------------------------------
# Safe reading
# --------------------------------------------------------------------------------------------
def plan_checksum(header: Mapping, tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the canonical JSON header (without its checksum) and every tensor (name, dtype, shape,
    bytes) in name order: any corruption of a plan file, in the header or the data, is detected on load."""
    h = hashlib.sha256()
    body = {k: v for k, v in header.items() if k != "checksum"}
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _path_arg(path, verb: str) -> str:
    try:
        path = os.fspath(path)
    except TypeError:
        raise PlanError(f"SteeringPlan.{verb}() expects a file path (str or os.PathLike), got "
                        f"{type(path).__name__}") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise PlanError(f"SteeringPlan.{verb}() got an empty path")
    if "\0" in path:
        raise PlanError(f"SteeringPlan.{verb}() got a path with a NUL character: {path!r}")
    return path


def _check_json(v, where: str, depth: int) -> None:
    """Raise PlanError naming the first value under ``where`` that would not survive a JSON round trip."""
    if depth > MAX_METADATA_DEPTH:
        raise PlanError(f"{where}: nested deeper than {MAX_METADATA_DEPTH} levels")
    if v is None or isinstance(v, (bool, str)) or type(v) is int:
        return
    if type(v) is float:
        if not math.isfinite(v):
            raise PlanError(f"{where}: {v!r} is not a finite number (JSON has no NaN/Infinity)")
        return
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise PlanError(f"{where}: key {k!r} is a {type(k).__name__}; metadata keys must be strings")
            _check_json(x, f"{where}[{k!r}]", depth + 1)
        return
    if isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            _check_json(x, f"{where}[{i}]", depth + 1)
        return
    hint = " (convert it with .item(), int() or float())" if hasattr(v, "item") else ""
    raise PlanError(f"{where}: {type(v).__module__}.{type(v).__name__} {v!r} is not a JSON value{hint}")


def _no_duplicate_keys(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


_DTYPES = {"F32": (torch.float32, 4), "I64": (torch.int64, 8)}


def _read_safetensors(data: bytes, source: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Parse a safetensors blob with bounded header, data-only, and strict checks."""
    if len(data) < 8:
        raise PlanError(f"{source}: not a plan file (truncated: {len(data)} bytes, need at least 8)")
    (hlen,) = struct.unpack("<Q", data[:8])
    if hlen > MAX_HEADER_BYTES:
        raise PlanError(f"{source}: header length {hlen} exceeds the {MAX_HEADER_BYTES} byte limit")
    if 8 + hlen > len(data):
        raise PlanError(f"{source}: truncated file (header says {hlen} bytes, file has {len(data) - 8})")
    try:
        st_header = json.loads(data[8:8 + hlen].decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise PlanError(f"{source}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(st_header, dict):
        raise PlanError(f"{source}: safetensors header must be a JSON object")
    meta = st_header.pop("__metadata__", None)
    if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
        raise PlanError(f"{source}: safetensors __metadata__ must map strings to strings")
    if not isinstance(meta, dict) or "fusesteer" not in meta:
        raise PlanError(f"{source}: not a fusesteer plan (no 'fusesteer' entry in the safetensors metadata)")
    if not isinstance(meta["fusesteer"], str):
        raise PlanError(f"{source}: metadata 'fusesteer' must be a JSON string")
    try:
        header = json.loads(meta["fusesteer"], parse_constant=_reject_constant, parse_float=_finite_float,
                            object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as e:
        raise PlanError(f"{source}: plan header is not valid JSON ({e})") from None
    if len(st_header) > 3 * MAX_ENTRIES:
        raise PlanError(f"{source}: too many tensors ({len(st_header)})")
    body = memoryview(data)[8 + hlen:]
    tensors: dict[str, torch.Tensor] = {}
    spans = []
    for name, info in st_header.items():
        if not isinstance(info, dict):
            raise PlanError(f"{source}: tensor {name!r}: descriptor must be an object")
        dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dt, str) or dt not in _DTYPES:
            raise PlanError(f"{source}: tensor {name!r} has dtype {dt!r}; "
                            "plan tensors must be F32 (a, b) or I64 (dims)")
        if (not isinstance(shape, list) or len(shape) > 1
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= 100_000_000 for s in shape)):
            raise PlanError(f"{source}: tensor {name!r} has shape {shape!r}; expected a 1-D shape")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise PlanError(f"{source}: tensor {name!r} has bad data_offsets {offs!r}")
        tdtype, esize = _DTYPES[dt]
        numel = math.prod(shape)
        start, end = offs
        if start < 0 or end < start or end > len(body) or end - start != numel * esize:
            raise PlanError(f"{source}: tensor {name!r}: data_offsets {offs} do not match shape {shape} "
                            f"and dtype {dt} within a body of {len(body)} bytes")
        spans.append((start, end, name))
        buf = bytes(body[start:end])
        t = torch.frombuffer(bytearray(buf), dtype=tdtype) if numel else torch.empty(0, dtype=tdtype)
        tensors[name] = t.reshape(shape).clone()
    spans.sort()
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise PlanError(f"{source}: tensors {n0!r} and {n1!r} overlap in the file")
    return header, tensors


def _fits_f32(v) -> bool:
    """A JSON number that is finite and stays finite as float32 (ints of any size included)."""
    return abs(v) <= F32_MAX if isinstance(v, int) else (math.isfinite(v) and abs(v) <= F32_MAX)


def _finite_float(text: str) -> float:
    """A JSON number literal as a float; one that overflows (1e400) is refused, like NaN/Infinity: the plan
    could be loaded but never saved again."""
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:40]} is out of the float range")
    return v


def _reject_constant(name):
    raise ValueError(f"non-finite number {name} is not allowed")


def _plan_from_header(header: Any, tensors: dict[str, torch.Tensor], source: str) -> PlanRecord:
    if not isinstance(header, dict):
        raise PlanError(f"{source}: plan header must be a JSON object")
    unknown = set(header) - {"format", "version", "model", "fingerprint", "name", "notes", "metadata", "entries",
                             "checksum"}
    if unknown:
        raise PlanError(f"{source}: unknown header fields {sorted(unknown)}")
    if not isinstance(header.get("format"), str) or header.get("format") != FORMAT_NAME:
        raise PlanError(f"{source}: header.format is {header.get('format')!r}, expected {FORMAT_NAME!r}")
    ver = header.get("version")
    if isinstance(ver, bool) or not isinstance(ver, int) or ver != FORMAT_VERSION:
        raise PlanError(f"{source}: header.version is {ver!r}; this fusesteer reads version {FORMAT_VERSION}")
    for key in ("model", "fingerprint", "entries", "checksum"):
        if key not in header:
            raise PlanError(f"{source}: header is missing the field {key!r}")
    checksum = header["checksum"]
    if not isinstance(checksum, str):
        raise PlanError(f"{source}: header.checksum must be the sha256 hex string of the plan")
    if checksum != plan_checksum(header, tensors):
        raise PlanError(f"{source}: the plan does not match header.checksum; the file is corrupted or was edited")
    spec = None
    if header["model"] is None and header["fingerprint"] is not None:
        raise PlanError(f"{source}: header.fingerprint is set but header.model is null; the file was edited")
    if header.get("model") is not None:
        spec = ModelSpec.from_dict(header["model"], where=f"{source}: header.model")
        fp = header.get("fingerprint")
        if fp != spec.fingerprint():
            raise PlanError(f"{source}: header.fingerprint {fp!r} does not match the model shape in the header "
                            f"(expected {spec.fingerprint()!r}); the file was edited or corrupted")
    for key in ("name", "notes"):
        v = header.get(key)
        if v is not None and not isinstance(v, str):
            raise PlanError(f"{source}: header.{key} must be a string or null, got {type(v).__name__}")
    meta = header.get("metadata", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise PlanError(f"{source}: header.metadata must be an object")
    entries = header.get("entries")
    if not isinstance(entries, list):
        raise PlanError(f"{source}: header.entries must be a list")
    if len(entries) > MAX_ENTRIES:
        raise PlanError(f"{source}: header has {len(entries)} entries (limit {MAX_ENTRIES})")
    plan = PlanRecord(spec, name=header.get("name"), notes=header.get("notes"), metadata=meta)
    used: set[str] = set()
    for i, rec in enumerate(entries):
        where = f"{source}: entry {i}"
        if not isinstance(rec, dict):
            raise PlanError(f"{where}: must be an object")
        unknown = set(rec) - {"layer", "site", "gating", "a", "b", "dims"}
        if unknown:
            raise PlanError(f"{where}: unknown fields {sorted(unknown)}")
        layer = rec.get("layer")
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise PlanError(f"{where}: layer must be an integer, got {layer!r}")
        site, gating = rec.get("site"), rec.get("gating", "all")
        if not isinstance(site, str):
            raise PlanError(f"{where}: site must be a string, got {site!r}")
        if not isinstance(gating, str):
            raise PlanError(f"{where}: gating must be a string, got {gating!r}")
        vals = {}
        for what in ("a", "b", "dims"):
            ref = rec.get(what)
            if ref is None:
                vals[what] = None
            elif isinstance(ref, dict) and set(ref) == {"scalar"} and what != "dims":
                v = ref["scalar"]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not _fits_f32(v):
                    shown = f"an integer of {v.bit_length()} bits" if type(v) is int else repr(v)
                    raise PlanError(f"{where}: {what}.scalar must be a finite number within the float32 range, "
                                    f"got {shown}")
                vals[what] = torch.tensor(float(v), dtype=torch.float32)
            elif isinstance(ref, dict) and set(ref) == {"tensor"} and isinstance(ref["tensor"], str):
                key = ref["tensor"]
                if key not in tensors:
                    raise PlanError(f"{where}: {what} refers to tensor {key!r}, which is not in the file")
                if key in used:
                    raise PlanError(f"{where}: tensor {key!r} is referenced twice")
                used.add(key)
                t = tensors[key]
                want = torch.int64 if what == "dims" else torch.float32
                if t.dtype != want:
                    raise PlanError(f"{where}: {what} tensor {key!r} has dtype {t.dtype}, expected {want}")
                vals[what] = t
            else:
                raise PlanError(f"{where}: {what} must be null, {{'scalar': x}} or {{'tensor': name}}, got {ref!r}")
        e = PlanEntry(layer=layer, site=site, gating=gating, a=vals["a"], b=vals["b"], dims=vals["dims"])
        try:
            e.validate(spec, len(plan.entries))
            plan.entries.append(e)
        except PlanError as err:
            raise PlanError(f"{source}: {err}") from None
    extra = set(tensors) - used
    if extra:
        raise PlanError(f"{source}: file holds tensors no entry refers to: {sorted(extra)[:5]}")
    return plan
