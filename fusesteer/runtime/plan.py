"""Steering plan IR: a set of diagonal affine maps x' = a*x + b at named sites of decoder layers.

This module knows nothing about torch modules: a plan is bound to a :class:`ModelSpec`
(model type, layer count, widths), validated against it, composed into dense per-phase maps,
and saved/loaded as safetensors with a JSON header (never pickle).
"""

from __future__ import annotations

import copy as _copy
import hashlib
import json
import math
import numbers
import os
import struct
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import torch

from ..errors import PlanError
from .sites import SITES, site

GATINGS = ("all", "prompt", "generated")
PHASES = ("prompt", "generated")

FORMAT_NAME = "fusesteer-plan"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_ENTRIES = 100_000
MAX_FILE_BYTES = 4 * 1024 * 1024 * 1024
MAX_METADATA_DEPTH = 64
F32_MAX = float(torch.finfo(torch.float32).max)


# --------------------------------------------------------------------------------------------
# Model shape
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """The shape a plan is bound to."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    attn_width: int  # num_attention_heads * head_dim: width of attn.o_proj.in

    def site_width(self, name: str) -> int:
        return getattr(self, site(name).width)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "model") -> "ModelSpec":
        if not isinstance(d, Mapping):
            raise PlanError(f"{where}: expected an object with the model shape, got {type(d).__name__}")
        unknown = set(d) - {"model_type", "num_layers", "hidden_size", "intermediate_size", "attn_width"}
        if unknown:
            raise PlanError(f"{where}: unknown fields {sorted(map(str, unknown))}")
        kw = {}
        for name, typ in (("model_type", str), ("num_layers", int), ("hidden_size", int),
                          ("intermediate_size", int), ("attn_width", int)):
            if name not in d:
                raise PlanError(f"{where}: missing field {name!r}")
            v = d[name]
            if typ is int and (isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v > 10_000_000):
                raise PlanError(f"{where}.{name}: expected a positive integer, got {v!r}")
            if typ is str and (not isinstance(v, str) or not v or len(v) > 200):
                raise PlanError(f"{where}.{name}: expected a non-empty string, got {v!r}")
            kw[name] = v
        return cls(**kw)

    def fingerprint(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_config(cls, config) -> "ModelSpec":
        cfg = getattr(config, "text_config", None) or config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(
            model_type=str(cfg.model_type),
            num_layers=int(cfg.num_hidden_layers),
            hidden_size=int(cfg.hidden_size),
            intermediate_size=int(cfg.intermediate_size),
            attn_width=int(heads * head_dim),
        )

    @classmethod
    def from_model(cls, model) -> "ModelSpec":
        return cls.from_config(model.config)

    def check_compatible(self, other: "ModelSpec") -> None:
        """Raise PlanError naming the first field where the plan's spec (self) differs from the model's."""
        for name in ("model_type", "num_layers", "hidden_size", "intermediate_size", "attn_width"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise PlanError(
                    f"plan was built for another model: {name} is {mine!r} in the plan but {theirs!r} in the "
                    f"model (plan fingerprint {self.fingerprint()}, model fingerprint {other.fingerprint()})"
                )


# --------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------
def _as_tensor(x, what: str, where: str, integer: bool = False) -> torch.Tensor | None:
    if x is None:
        return None
    if isinstance(x, bool):
        raise PlanError(f"{where}: {what} must be a number or tensor, got a bool")
    try:
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu")
        else:
            t = torch.as_tensor(x)
    except Exception as e:  # noqa: BLE001 - converted into a specific message
        raise PlanError(f"{where}: {what} could not be read as a tensor ({type(x).__name__}: {e})") from None
    if integer:
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise PlanError(f"{where}: {what} must hold integers, got dtype {t.dtype}")
        return t.to(torch.int64).contiguous()
    if t.dtype.is_complex or t.dtype == torch.bool:
        raise PlanError(f"{where}: {what} must be real numbers, got dtype {t.dtype}")
    return t.to(torch.float32).contiguous()


@dataclass
class PlanEntry:
    """One map x' = a*x + b at (layer, site). ``dims`` makes it sparse: a/b act on those dims only."""

    layer: int
    site: str
    a: torch.Tensor | None = None  # fp32, shape [] or [n]
    b: torch.Tensor | None = None  # fp32, shape [] or [n]
    dims: torch.Tensor | None = None  # int64 [n], unique, sorted not required
    gating: str = "all"

    def describe(self, index: int | None = None) -> str:
        head = f"entry {index} " if index is not None else "entry "
        return f"{head}(layer={self.layer}, site={self.site!r}, gating={self.gating!r})"

    def validate(self, spec: ModelSpec | None, index: int | None = None) -> None:
        where = self.describe(index)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise PlanError(f"{where}: layer must be an int, got {type(self.layer).__name__}")
        if self.layer < 0:
            raise PlanError(f"{where}: layer {self.layer} is negative; layers are 0-based")
        if spec is not None and self.layer >= spec.num_layers:
            raise PlanError(f"{where}: layer {self.layer} is out of range; the model has "
                            f"{spec.num_layers} layers (0..{spec.num_layers - 1})")
        if self.site not in SITES:
            raise PlanError(f"{where}: unknown site {self.site!r}; expected one of {', '.join(SITES)}")
        if self.gating not in GATINGS:
            raise PlanError(f"{where}: unknown gating {self.gating!r}; expected one of {', '.join(GATINGS)}")
        for what, t, want in (("a", self.a, torch.float32), ("b", self.b, torch.float32),
                              ("dims", self.dims, torch.int64)):
            if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != want or t.device.type != "cpu"):
                got = (f"a {t.dtype} tensor on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__)
                raise PlanError(f"{where}: {what} must be a {want} CPU tensor (plan.add() converts values), got {got}")
        width = spec.site_width(self.site) if spec is not None else None
        n = None
        if self.dims is not None:
            d = self.dims
            if d.dim() != 1 or d.numel() == 0:
                raise PlanError(f"{where}: dims must be a non-empty 1-D list of indices, got shape {tuple(d.shape)}")
            if int(d.min()) < 0:
                raise PlanError(f"{where}: dims contains negative index {int(d.min())}")
            if width is not None and int(d.max()) >= width:
                raise PlanError(f"{where}: dims index {int(d.max())} is out of range for site {self.site!r} "
                                f"of width {width} (expected 0..{width - 1})")
            if torch.unique(d).numel() != d.numel():
                raise PlanError(f"{where}: dims contains duplicate indices")
            n = d.numel()
        else:
            n = width
        for what, t in (("a", self.a), ("b", self.b)):
            if t is None:
                continue
            if t.dim() > 1:
                raise PlanError(f"{where}: {what} must be a scalar or 1-D vector, got shape {tuple(t.shape)}")
            if t.dim() == 1:
                if n is None:
                    n = t.numel()
                if t.numel() != n:
                    exp = f"len(dims)={n}" if self.dims is not None else f"the site width {n}"
                    raise PlanError(f"{where}: {what} has length {t.numel()}, expected {exp}")
            if not bool(torch.isfinite(t).all()):
                raise PlanError(f"{where}: {what} contains NaN or Inf")

    def dense(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense fp32 (a, b) of length ``width``."""
        a = torch.ones(width, dtype=torch.float32)
        b = torch.zeros(width, dtype=torch.float32)
        if self.dims is None:
            if self.a is not None:
                a[:] = self.a
            if self.b is not None:
                b[:] = self.b
        else:
            if self.a is not None:
                a[self.dims] = self.a
            if self.b is not None:
                b[self.dims] = self.b
        return a, b

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b, self.dims) if t is not None)


def compose(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]):
    """Compose two dense maps: apply ``first`` then ``second`` -> (a2*a1, a2*b1 + b2)."""
    a1, b1 = first
    a2, b2 = second
    return a2 * a1, a2 * b1 + b2


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------
class SteeringPlan:
    """A list of :class:`PlanEntry` bound to a :class:`ModelSpec`.

    Entries at the same (layer, site) compose in the order they were added.
    """

    def __init__(self, spec: ModelSpec | None = None, entries: Iterable[PlanEntry] = (),
                 name: str | None = None, notes: str | None = None, metadata: dict | None = None):
        self.spec = spec
        self.entries: list[PlanEntry] = []
        self.name = name
        self.notes = notes
        self.metadata: dict = dict(metadata or {})
        for e in entries:
            self._append(e)

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def for_model(cls, model, **kw) -> "SteeringPlan":
        return cls(ModelSpec.from_model(model), **kw)

    @classmethod
    def for_spec(cls, spec: ModelSpec, **kw) -> "SteeringPlan":
        return cls(spec, **kw)

    def _append(self, e: PlanEntry) -> None:
        if len(self.entries) >= MAX_ENTRIES:
            raise PlanError(f"plan has too many entries (limit {MAX_ENTRIES})")
        e.validate(self.spec, len(self.entries))
        self.entries.append(e)

    def add(self, layer: int, site: str, a=None, b=None, dims=None, gating: str = "all") -> "SteeringPlan":
        """Add x' = a*x + b at (layer, site). a: scalar or vector; b: vector (or scalar); dims: sparse indices."""
        where = f"entry {len(self.entries)} (layer={layer}, site={site!r}, gating={gating!r})"
        if isinstance(layer, torch.Tensor) and layer.numel() == 1:
            layer = int(layer)
        try:
            import numpy as _np
            if isinstance(layer, _np.integer):
                layer = int(layer)
        except ImportError:  # pragma: no cover
            pass
        e = PlanEntry(layer=layer, site=site, gating=gating,
                      a=_as_tensor(a, "a", where), b=_as_tensor(b, "b", where),
                      dims=_as_tensor(dims, "dims", where, integer=True))
        if e.dims is not None and e.dims.dim() == 0:
            e.dims = e.dims.reshape(1)
        self._append(e)
        return self

    def extend(self, other: "SteeringPlan") -> "SteeringPlan":
        """Append all entries of ``other`` (they compose after this plan's entries). All or nothing: if one
        entry does not fit, the plan is left as it was. ``plan.extend(plan)`` appends its entries once."""
        if not isinstance(other, SteeringPlan):
            raise PlanError(f"extend() expects a SteeringPlan, got {type(other).__name__}")
        if self.spec is not None and other.spec is not None:
            other.spec.check_compatible(self.spec)
        new = [PlanEntry(e.layer, e.site, e.a, e.b, e.dims, e.gating) for e in list(other.entries)]
        if len(self.entries) + len(new) > MAX_ENTRIES:
            raise PlanError(f"extend(): the plan would have {len(self.entries) + len(new)} entries "
                            f"(limit {MAX_ENTRIES})")
        for i, e in enumerate(new):
            e.validate(self.spec, len(self.entries) + i)
        self.entries.extend(new)
        return self

    def copy(self) -> "SteeringPlan":
        p = SteeringPlan(self.spec, name=self.name, notes=self.notes, metadata=_copy.deepcopy(self.metadata))
        for e in self.entries:
            p.entries.append(PlanEntry(e.layer, e.site,
                                       None if e.a is None else e.a.clone(),
                                       None if e.b is None else e.b.clone(),
                                       None if e.dims is None else e.dims.clone(), e.gating))
        return p

    def scaled(self, s: float) -> "SteeringPlan":
        """Plan with every additive part multiplied by s and every gain moved to 1 + s*(a - 1). Raises
        PlanError if s is not a finite number or a scaled value leaves the float32 range."""
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(float(s)):
            raise PlanError(f"scaled(): the scale must be a finite number, got {s!r}")
        s = float(s)
        p = self.copy()
        for e in p.entries:
            if e.b is not None:
                e.b = (e.b.double() * s).float()
            if e.a is not None:
                e.a = (1.0 + s * (e.a.double() - 1.0)).float()
        for i, e in enumerate(p.entries):
            for what, t in (("a", e.a), ("b", e.b)):
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise PlanError(f"scaled({s!r}): {e.describe(i)}: the scaled {what} leaves the float32 range "
                                    f"(|value| > {F32_MAX:.3g})")
        return p

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        fp = self.spec.fingerprint() if self.spec else "unbound"
        return f"SteeringPlan(name={self.name!r}, entries={len(self.entries)}, model={fp})"

    # ---- semantics ----------------------------------------------------------------------------
    def bind(self, spec: ModelSpec) -> "SteeringPlan":
        """Check this plan against a model spec (raising PlanError), bind it if unbound, return self."""
        if self.spec is not None:
            self.spec.check_compatible(spec)
        else:
            self.spec = spec
        self.validate()
        return self

    def validate(self) -> None:
        for i, e in enumerate(self.entries):
            e.validate(self.spec, i)

    def is_identity(self) -> bool:
        for e in self.entries:
            if e.a is not None and not bool((e.a == 1).all()):
                return False
            if e.b is not None and not bool((e.b == 0).all()):
                return False
        return True

    def sites_used(self) -> set[tuple[int, str]]:
        return {(e.layer, e.site) for e in self.entries}

    def phase_maps(
        self, spec: ModelSpec | None = None
    ) -> dict[tuple[int, str], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Dense composed maps: {(layer, site): {"prompt": (a, b), "generated": (a, b)}} (fp32, CPU)."""
        spec = spec or self.spec
        if spec is None:
            raise PlanError("plan is not bound to a model; call plan.bind(ModelSpec.from_model(model)) or "
                            "attach it to a model first")
        out: dict = {}
        for e in self.entries:
            key = (e.layer, e.site)
            width = spec.site_width(e.site)
            if key not in out:
                ident = (torch.ones(width), torch.zeros(width))
                out[key] = {ph: ident for ph in PHASES}
            m = e.dense(width)
            for ph in PHASES:
                if e.gating in ("all", ph):
                    out[key][ph] = compose(out[key][ph], m)
        return out

    # ---- file format ----------------------------------------------------------------------------
    def header(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "model": self.spec.to_dict() if self.spec else None,
            "fingerprint": self.spec.fingerprint() if self.spec else None,
            "name": self.name,
            "notes": self.notes,
            "metadata": self.metadata,
            "entries": [],
        }

    def check_header(self) -> None:
        """What save() writes must load again: name and notes strings (or None), metadata of JSON values
        (str keys; None, bools, ints, finite floats, strings, lists, dicts), valid entries."""
        for key in ("name", "notes"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, str):
                raise PlanError(f"plan.{key} must be a string or None, got {type(v).__name__} {v!r}")
        if not isinstance(self.metadata, dict):
            raise PlanError(f"plan.metadata must be a dict, got {type(self.metadata).__name__}")
        _check_json(self.metadata, "plan.metadata", 0)
        if self.spec is not None and not isinstance(self.spec, ModelSpec):
            raise PlanError(f"plan.spec must be a ModelSpec or None, got {type(self.spec).__name__}")
        if len(self.entries) > MAX_ENTRIES:
            raise PlanError(f"plan has {len(self.entries)} entries (limit {MAX_ENTRIES})")
        for i, e in enumerate(self.entries):
            if not isinstance(e, PlanEntry):
                raise PlanError(f"plan.entries[{i}] must be a PlanEntry, got {type(e).__name__}")
        self.validate()

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan (safetensors + JSON header) atomically; a plan that would not load again, or a path
        that cannot be written, raises PlanError and leaves no file behind."""
        from safetensors.torch import save_file

        self.check_header()
        header = self.header()
        tensors: dict[str, torch.Tensor] = {}
        for i, e in enumerate(self.entries):
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

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SteeringPlan":
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
        return cls.from_bytes(data, source=path)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> "SteeringPlan":
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
        header = json.loads(meta["fusesteer"], parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
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


def _reject_constant(name):
    raise ValueError(f"non-finite number {name} is not allowed")


def _plan_from_header(header: Any, tensors: dict[str, torch.Tensor], source: str) -> SteeringPlan:
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
    plan = SteeringPlan(spec, name=header.get("name"), notes=header.get("notes"), metadata=meta)
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
            plan._append(e)
        except PlanError as err:
            raise PlanError(f"{source}: {err}") from None
    extra = set(tensors) - used
    if extra:
        raise PlanError(f"{source}: file holds tensors no entry refers to: {sorted(extra)[:5]}")
    return plan
