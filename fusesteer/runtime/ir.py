"""The plan IR's parts: the model shape a plan is bound to (:class:`ModelSpec`), one entry (:class:`PlanEntry`,
a diagonal affine map at one (layer, site)), map composition, and the bounds every plan respects. The plan
itself (:class:`~.plan.SteeringPlan`) and its file format (:mod:`.planfile`) are built on these.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch

from ..errors import PlanError
from .sites import SITES, site

GATINGS = ("all", "prompt", "generated")
PHASES = ("prompt", "generated")

# per plan (also the file loader's bound): 128 layers x 4 sites x 3 gatings is 1,536 distinct maps; the bound
# keeps the work of one plan write (validate, compose, write the tables) to a fraction of a second
MAX_ENTRIES = 8192
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
