"""The `fold` backend: a static plan folded into the weights at attach time (zero run-time cost).

A plan that is the same for every row and every position is a set of diagonal affine maps next to linear
layers, and a diagonal map next to a linear is itself linear:

* ``attn.o_proj.in`` / ``mlp.down_proj.in`` (input of ``o_proj`` / ``down_proj``, weight W, bias c):
  ``W(a*x + b) + c = (W diag(a)) x + (W b + c)``: column i of W scales by a_i, ``W b`` (original W, fp32)
  goes into the bias;
* ``mlp.out`` (output of ``down_proj``): ``a*(W x + c) + b``: row i of W and c_i scale by a_i, b adds to
  the bias;
* ``layer.out`` with a = 1 on pre-norm layouts (Llama, Qwen, Mistral, Phi-3, Granite with b / residual_multiplier):
  the layer output is ``residual + down_proj(...)``, so b adds to
  ``down_proj``'s bias (after any ``mlp.out`` map of the same layer). Not on Gemma 2/3 or OLMo-2, whose
  post-feedforward norm sits between ``down_proj`` and the residual add, and not on Qwen3-MoE's sparse layers,
  whose MLP output is a routed sum of experts with no single ``down_proj`` (``mlp.out`` does not fold there
  either).

The products are computed in fp32 from the original weights and rounded once to the weights' dtype.
A bias is created when the linear has none and removed again on detach. Only the touched slices of each
weight (columns scaled by a sparse input gain, rows scaled by an output gain; the whole weight when that is
smaller) and the biases that change are kept for the restore, which is registered on the handle's patcher,
so detach (or an exception inside ``with attach(...)``) puts every parameter back bit for bit.

Nothing is patched at run time: a fully folded model runs its own, unmodified forwards. The attachment is
static: ``handle.update()`` and routing rows to no plan refuse (``auto`` refolds / unfolds instead).
:func:`fold_reasons` says, per (layer, site), whether it folds and why not; the ``auto`` backend uses it to
fold what folds and run the rest on the fused path.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ...errors import AttachError, NonFiniteActivationError
from ..patching import foreign_forward, foreign_hooks
from ..sites import REGISTRY, module_at
from ..sites import site as site_record
from ..tables import slot_of
from ..tp import is_dtensor, local
from .base import Backend

log = logging.getLogger("fusesteer")

_FOLD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SLOT = slot_of(1, False)  # plan 1, prompt tokens (must equal the generated-token row)
_GEN_SLOT = slot_of(1, True)


@dataclass(frozen=True)
class Refusal:
    """Why one (layer, site) does not fold: ``tag`` is short (for the log line), ``text`` the full reason."""

    tag: str
    text: str
    entry: str  # the plan entry it is about, e.g. "entry 4 (layer=1, site='layer.out', gating='all')"


# --------------------------------------------------------------------------------------------------
# where a site folds to
# --------------------------------------------------------------------------------------------------
def target_linear(parts, layer: int, site: str) -> tuple[str, nn.Module]:
    """(qualified name, module) of the linear a site folds into."""
    path = site_record(site).fold_linear
    return f"model.layers.{layer}.{path}", module_at(parts.layers[layer], path)


def _span(t: torch.Tensor) -> tuple[int, int] | None:
    """Byte range [start, end) a tensor's elements occupy on this rank (None for empty/meta tensors); a
    DTensor's is its local shard's."""
    t = local(t)
    if t.numel() == 0 or t.device.type == "meta":
        return None
    start = t.data_ptr()
    extent = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
    return start, start + extent * t.element_size()


class _SharedIndex:
    """Byte ranges of every parameter and buffer of the model (duplicates kept), to find shared storage."""

    def __init__(self, model: nn.Module):
        self.items: list[tuple[int, int, str, torch.device]] = []
        named = list(model.named_parameters(remove_duplicate=False))
        named += list(model.named_buffers(remove_duplicate=False))
        for name, t in named:
            sp = _span(t)
            if sp is not None:
                self.items.append((sp[0], sp[1], name, t.device))

    def sharers(self, t: torch.Tensor, own_name: str) -> list[str]:
        sp = _span(t)
        if sp is None:
            return []
        s0, e0 = sp
        return sorted({n for s, e, n, d in self.items
                       if n != own_name and d == t.device and s < e0 and s0 < e})


def _linear_problem(name: str, mod: nn.Module, shared: _SharedIndex) -> Refusal | None:
    """A reason the weights of ``mod`` cannot be rewritten in place, or None."""
    tmod = type(mod)
    wt = getattr(mod, "weight", None)
    if "bitsandbytes" in tmod.__module__ or (wt is not None and "bitsandbytes" in type(wt).__module__):
        return Refusal("bitsandbytes", f"{name} is a bitsandbytes {tmod.__name__}: its quantized weights cannot "
                                       f"be scaled in place", "")
    if not isinstance(mod, nn.Linear) or not isinstance(wt, torch.Tensor):
        return Refusal("not nn.Linear", f"{name} is a {tmod.__name__}, not a plain torch.nn.Linear", "")
    if wt.dtype not in _FOLD_DTYPES:
        return Refusal("weight dtype", f"{name}.weight has dtype {wt.dtype}; folding needs float32, float16, "
                                       f"bfloat16 or float64 weights", "")
    if wt.device.type == "meta" or (mod.bias is not None and mod.bias.device.type == "meta"):
        return Refusal("offloaded", f"{name} has its weights offloaded (meta device); they cannot be folded "
                                    f"in place", "")
    for pname in ("weight", "bias"):
        t = getattr(mod, pname)
        if t is None:
            continue
        others = shared.sharers(t, f"{name}.{pname}")
        if others:
            return Refusal("shared weight", f"{name}.{pname} shares its memory with {', '.join(others[:3])} (tied "
                                            f"or shared weights): folding would change those too", "")
    return None


def _parallel_bias(parts, key, table) -> Refusal | None:
    """Under tensor parallelism the target linear's output is this rank's partial sum, all-reduced after it:
    gains fold into each rank's shard exactly, but a bias would need one rank to own it. Refused instead."""
    name, mod = target_linear(parts, *key)
    if not is_dtensor(mod.weight):
        return None
    rec = site_record(key[1])
    adds = bool((table.B[_SLOT] != 0).any()) or (rec.fold == "rows+bias" and mod.bias is not None
                                                 and not bool(table.additive_rows[_SLOT]))
    if not adds:
        return None
    return Refusal("tensor parallel bias", f"{name} is split across tensor-parallel ranks and all-reduced after its "
                                           f"matmul: a folded bias (b != 0 at {key[1]!r}) would have to be added "
                                           f"once, after the all-reduce; only gains fold under tensor parallelism",
                   "")


def _has_fold_target(parts, layer: int, site: str) -> bool:
    try:
        return isinstance(target_linear(parts, layer, site)[1], nn.Module)
    except AttributeError:
        return False


def _path_problem(parts, layer: int, site: str) -> Refusal | None:
    """A forward wrapper (or output hooks) of another library on the modules a folded map would move across:
    folded into the linear, the map would apply on the other side of what that library does."""
    lay = parts.layers[layer]
    for name, out_hooks in site_record(site).fold_across:
        mod = module_at(lay, name)
        what = foreign_forward(mod, skipped=False)
        if what is None and out_hooks:
            what = foreign_hooks(mod, "output")
        if what is not None:
            full = f"model.layers.{layer}" + (f".{name}" if name else "")
            return Refusal("foreign forward", f"{full} has {what} installed by another library, and a folded map "
                                              f"would act on the other side of it", "")
    return None


# --------------------------------------------------------------------------------------------------
# which (layer, site) folds
# --------------------------------------------------------------------------------------------------
def _entries_by_key(handle) -> dict[tuple[int, str], list[tuple[int, object]]]:
    plan = handle.plans[handle.plan_names[0]]
    out: dict = {}
    for i, e in enumerate(plan.entries):
        out.setdefault((e.layer, e.site), []).append((i, e))
    return out


def _is_identity(table) -> bool:
    return bool(table.identity_rows[_SLOT])


def fold_reasons(handle, keys=None) -> dict[tuple[int, str], Refusal | None]:
    """For each (layer, site) of ``handle.tables`` (or ``keys``): None if it folds, else a :class:`Refusal`."""
    all_keys = sorted(handle.tables)
    keys = all_keys if keys is None else sorted(keys)
    if len(handle.plan_names) != 1:
        text = (f"{len(handle.plan_names)} plans are attached for per-row routing, but folded weights act on "
                f"every row alike")
        return {k: Refusal("per-row plans", text, f"the plans {handle.plan_names}") for k in keys}
    parts = handle.parts
    fam = parts.family
    by_key = _entries_by_key(handle)
    shared = _SharedIndex(handle.model)
    linear_cache: dict[str, Refusal | None] = {}
    out: dict = {}

    def linear_ok(layer, site):
        name, mod = target_linear(parts, layer, site)
        if name not in linear_cache:
            linear_cache[name] = _linear_problem(name, mod, shared)
        return linear_cache[name]

    def _first(key):
        entries = by_key.get(key, [])
        return entries[0][1].describe(entries[0][0]) if entries else f"(layer={key[0]}, site={key[1]!r})"

    for key in all_keys:
        layer, site = key
        table = handle.tables[key]
        entries = by_key.get(key, [])
        first = _first(key)
        why = None
        gated = [(i, e) for i, e in entries if e.gating != "all"]
        if gated:
            i, e = gated[0]
            why = Refusal("gated", f"it is gated to {e.gating!r} tokens, but a folded weight acts on every token",
                          e.describe(i))
        elif not (torch.equal(table.A[_SLOT], table.A[_GEN_SLOT]) and torch.equal(table.B[_SLOT], table.B[_GEN_SLOT])):
            why = Refusal("gated", "its prompt and generated-token maps differ", first)
        elif site_record(site).fold == "bias" and not _is_identity(table):
            if not bool(table.additive_rows[_SLOT]):
                why = Refusal(f"{site} a!=1", f"it scales the residual stream (a != 1), which no single weight "
                                              f"computes; only an additive {site} (a = 1) folds", first)
            elif fam.layout != "pre":
                why = Refusal(f"{fam.name} {site}",
                              f"on {fam.name} the post_feedforward_layernorm sits between down_proj and the "
                              f"residual add, so a {site} bias has no linear bias to fold into", first)
        if why is None and not _is_identity(table) and not _has_fold_target(parts, layer, site):
            why = Refusal("moe experts", f"layer {layer} is a sparse MoE layer: its output is a routed, weighted sum "
                                         f"of expert MLPs with no single down_proj to fold {site!r} into", first)
        if why is None and not _is_identity(table):
            prob = linear_ok(layer, site) or _path_problem(parts, layer, site) or _parallel_bias(parts, key, table)
            if prob is not None:
                why = Refusal(prob.tag, prob.text, first)
        out[key] = why
    # a "bias" fold (layer.out) goes into the linear's bias *after* the rows+bias map (mlp.out) of the same
    # linear: that map must fold too.
    for key in all_keys:
        layer, site = key
        rec = site_record(site)
        if rec.fold != "bias" or out[key] is not None or _is_identity(handle.tables[key]):
            continue
        before = next(r.name for r in REGISTRY.values() if r.fold == "rows+bias" and r.fold_linear == rec.fold_linear)
        mk = (layer, before)
        if mk in out and out[mk] is not None and not all(handle.tables[mk].identity_rows):
            out[key] = Refusal(f"{before} not folded",
                               f"the {before} map of this layer does not fold, and it must apply before the "
                               f"{site} bias that would go into {rec.fold_linear}'s bias", _first(key))
    return {k: out[k] for k in keys}


# --------------------------------------------------------------------------------------------------
# folding
# --------------------------------------------------------------------------------------------------
@dataclass
class _LinearFold:
    name: str
    module: nn.Module
    sites: list = field(default_factory=list)
    a_in: torch.Tensor | None = None  # column gains (input map)
    b_in: torch.Tensor | None = None
    a_out: torch.Tensor | None = None  # row gains (output map)
    b_out: torch.Tensor | None = None  # added to the bias (mlp.out b, then layer.out b)


@dataclass
class FoldResult:
    """What :func:`apply_folds` changed; ``restore_bytes`` is everything it keeps for the restore."""

    keys: list = field(default_factory=list)
    modules: list = field(default_factory=list)  # dicts: name, cols, rows, full, bias, bytes
    created_biases: list = field(default_factory=list)
    restore_slice_bytes: int = 0  # weight slices kept
    restore_bias_bytes: int = 0  # original biases kept
    restore_index_bytes: int = 0  # column/row indices kept

    @property
    def restore_bytes(self) -> int:
        return self.restore_slice_bytes + self.restore_bias_bytes + self.restore_index_bytes

    def as_dict(self) -> dict:
        return {
            "folded": [list(k) for k in self.keys],
            "modules": self.modules,
            "created_biases": list(self.created_biases),
            "restore_bytes": self.restore_bytes,
            "restore_slice_bytes": self.restore_slice_bytes,
            "restore_bias_bytes": self.restore_bias_bytes,
            "restore_index_bytes": self.restore_index_bytes,
        }


def _collect(handle, keys) -> list[_LinearFold]:
    parts = handle.parts
    folds: dict[str, _LinearFold] = {}
    for key in sorted(keys, key=lambda k: (k[0], site_record(k[1]).order)):
        layer, site = key
        table = handle.tables[key]
        if _is_identity(table):
            continue
        name, mod = target_linear(parts, layer, site)
        f = folds.setdefault(name, _LinearFold(name, mod))
        f.sites.append(site)
        dev = mod.weight.device
        a = table.A[_SLOT].to(dev, torch.float32)
        b = table.B[_SLOT].to(dev, torch.float32)
        has_a = not bool(table.additive_rows[_SLOT])
        has_b = bool((b != 0).any())
        how = site_record(site).fold
        if how == "columns":
            f.a_in = a if has_a else None
            f.b_in = b if has_b else None
        elif how == "rows+bias":
            f.a_out = a if has_a else None
            f.b_out = b if has_b else None
        else:  # "bias" (layer.out), a == 1 (checked by fold_reasons): adds after the rows+bias map
            if has_b:
                mult = getattr(parts.layers[layer], "residual_multiplier", None) if \
                    parts.family.residual_multiplier else None
                if mult is not None:  # Granite: out = s + m * down(...), so b enters the bias as b / m
                    b = b / float(mult)
                f.b_out = b if f.b_out is None else f.b_out + b
    return list(folds.values())


def apply_folds(handle, keys, check_finite: bool | None = None, patcher=None) -> FoldResult:
    """Fold the tables at ``keys`` (all foldable, see :func:`fold_reasons`) into the weights.

    Every change is registered on ``patcher`` (default ``handle.patcher``) before it is made, so
    ``patcher.restore()`` (detach, or a failure half-way) puts the original parameters back bit for bit.
    """
    patcher = handle.patcher if patcher is None else patcher
    if check_finite is None:
        check_finite = bool(getattr(handle, "check_finite", True))
    res = FoldResult(keys=sorted(keys))
    folds = _collect(handle, keys)
    with torch.inference_mode(False), torch.no_grad():
        prepared = [_prepare(f, check_finite) for f in folds]
        for f, prep in zip(folds, prepared):
            _commit(patcher, f, prep, res)
    return res


def _prepare(f: _LinearFold, check_finite: bool) -> dict:
    """Compute the new weight slices and bias (fp32 math, one rounding) without touching the module."""
    mod = f.module
    W = local(mod.weight).detach()
    dt = W.dtype
    ct = torch.float64 if dt == torch.float64 else torch.float32  # compute dtype: fp32 (fp64 stays fp64)
    a_in, b_in, a_out, b_out = (None if t is None else t.to(ct) for t in (f.a_in, f.b_in, f.a_out, f.b_out))
    out_f, in_f = W.shape
    cols = torch.nonzero(a_in != 1).flatten() if a_in is not None else None
    rows = torch.nonzero(a_out != 1).flatten() if a_out is not None else None
    cols = cols if cols is not None and cols.numel() else None
    rows = rows if rows is not None and rows.numel() else None
    new_cols = new_rows = None
    if cols is not None:
        x = W.index_select(1, cols).to(ct) * a_in.index_select(0, cols)
        if a_out is not None:
            x = x * a_out[:, None]
        new_cols = x.to(dt)
    if rows is not None:
        x = W.index_select(0, rows).to(ct)
        if a_in is not None:
            x = x * a_in
        new_rows = (x * a_out.index_select(0, rows)[:, None]).to(dt)
    old_bias = mod.bias
    need_bias = b_in is not None or b_out is not None or (old_bias is not None and rows is not None)
    new_bias = None
    if need_bias:
        c = old_bias.detach().to(ct) if old_bias is not None else torch.zeros(out_f, dtype=ct, device=W.device)
        if b_in is not None:
            c = c + W.to(ct) @ b_in  # W b with the ORIGINAL weight, in fp32
        if a_out is not None:
            c = a_out * c
        if b_out is not None:
            c = c + b_out
        new_bias = c.to(dt)
    if check_finite:
        for what, t in (("weights", new_cols), ("weights", new_rows), ("bias", new_bias)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise NonFiniteActivationError(
                    f"folding the plan into {f.name} ({', '.join(f.sites)}) gives non-finite {what} in {dt}; the "
                    f"plan's values are too large for this model/dtype (pass check_finite=False to attach() to "
                    f"skip this check)")
    # what to keep for the restore: the touched slices, or the whole weight when that is smaller
    kc = 0 if cols is None else cols.numel()
    kr = 0 if rows is None else rows.numel()
    full = kc * out_f + kr * in_f >= out_f * in_f
    return dict(cols=cols, rows=rows, new_cols=new_cols, new_rows=new_rows, new_bias=new_bias, full=full)


def _layout(t) -> tuple | None:
    return None if t is None else (t.dtype, t.device, tuple(t.shape))


def _check_layout(name: str, t, was: tuple) -> None:
    now = _layout(t)
    if now != was:
        shown = "gone" if now is None else f"{now[0]} on {now[1]} with shape {list(now[2])}"
        raise AttachError(
            f"cannot restore {name} exactly: it is now {shown}, but was {was[0]} on {was[1]} with shape "
            f"{list(was[2])} when the plan was folded into it (it was changed behind fusesteer's back, e.g. "
            f"through .data). Put it back as it was and call detach() again")


_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _fingerprint(t) -> tuple | None:
    """What changes when a tensor is written by anyone (copy_, set_, .data = ..., .data.copy_, load_state_dict):
    its storage address, version counter and the sum of its bits."""
    if t is None:
        return None
    d = t.detach()
    bits = d.contiguous().view(_INT_VIEW[d.element_size()]).sum(dtype=torch.int64)
    return d.data_ptr(), (-1 if d.is_inference() else t._version), int(bits)


def _written_since(name: str, t, fp) -> str | None:
    """A warning when ``t`` was written since the fold left it with fingerprint ``fp`` (else None)."""
    if fp is None or _fingerprint(t) == fp:
        return None
    return (f"fusesteer: {name} was written while a plan was folded into it (load_state_dict, copy_, set_ or "
            f".data); detach() keeps what was written there instead of restoring its pre-attach values")


def _commit(patcher, f: _LinearFold, p: dict, res: FoldResult) -> None:
    mod = f.module
    W = local(mod.weight)
    cols, rows, full = p["cols"], p["rows"], p["full"]
    info = {"name": f.name, "sites": list(f.sites), "cols": 0 if cols is None else int(cols.numel()),
            "rows": 0 if rows is None else int(rows.numel()), "full_copy": False, "bias": None, "bytes": 0}
    saved_full = saved_cols = saved_rows = saved_bias = None
    if cols is not None or rows is not None:
        if full:
            saved_full = W.detach().clone()
            info["full_copy"] = True
        else:
            if cols is not None:
                saved_cols = W.detach().index_select(1, cols)
            if rows is not None:
                saved_rows = W.detach().index_select(0, rows)
    if saved_full is not None:
        cols = rows = None  # the restore writes the whole weight back: keep no indices
    created = False
    had_bias_key = "bias" in mod._parameters
    if p["new_bias"] is not None:
        if mod.bias is None:
            created = True
            info["bias"] = "created"
        else:
            saved_bias = mod.bias.detach().clone()
            info["bias"] = "changed"
    kept_idx = [t for t in (cols, rows) if t is not None]

    prints: dict = {}  # fingerprints of the weight and bias as the fold leaves them (filled in below)

    def undo(mod=mod, saved_full=saved_full, saved_cols=saved_cols, saved_rows=saved_rows,
             saved_bias=saved_bias, cols=cols, rows=rows, created=created, had_bias_key=had_bias_key,
             was=_layout(W)):
        # the parameters as they are now (not as captured), checked before anything is written: a failure
        # leaves this step whole for a retry
        W = local(mod.weight)
        _check_layout(f.name + ".weight", W, was)
        if saved_bias is not None:
            _check_layout(f.name + ".bias", mod.bias, _layout(saved_bias))
        # a tensor written behind fusesteer's back keeps what was written (said out loud): restoring would
        # silently replace it with the pre-attach values
        notes = {k: _written_since(f"{f.name}.{k}", local(getattr(mod, k)), prints.get(k)) for k in ("weight", "bias")}
        for note in filter(None, notes.values()):
            warnings.warn(note, RuntimeWarning, stacklevel=2)
            log.warning("%s", note)
        with torch.inference_mode(False), torch.no_grad():
            if notes["bias"] is None:
                if created:
                    if had_bias_key:
                        mod._parameters["bias"] = None
                    else:
                        mod._parameters.pop("bias", None)
                elif saved_bias is not None:
                    mod.bias.copy_(saved_bias)
            if notes["weight"] is None and saved_full is not None:
                W.copy_(saved_full)
            elif notes["weight"] is None:
                if saved_rows is not None:
                    W.index_copy_(0, rows, saved_rows)
                if saved_cols is not None:
                    W.index_copy_(1, cols, saved_cols)

    patcher.add_undo(undo)  # registered before any change: a failure below still restores
    if p["new_cols"] is not None:
        W.index_copy_(1, p["cols"], p["new_cols"])
    if p["new_rows"] is not None:
        W.index_copy_(0, p["rows"], p["new_rows"])
    if p["new_bias"] is not None:
        if created:
            mod.bias = nn.Parameter(p["new_bias"], requires_grad=W.requires_grad)
            res.created_biases.append(f.name)
        else:
            mod.bias.copy_(p["new_bias"])
    prints.update(weight=_fingerprint(W), bias=_fingerprint(mod.bias) if p["new_bias"] is not None else None)
    kept_w = [t for t in (saved_full, saved_cols, saved_rows) if t is not None]
    slice_b = sum(t.numel() * t.element_size() for t in kept_w)
    bias_b = 0 if saved_bias is None else saved_bias.numel() * saved_bias.element_size()
    idx_b = sum(t.numel() * t.element_size() for t in kept_idx)
    res.restore_slice_bytes += slice_b
    res.restore_bias_bytes += bias_b
    res.restore_index_bytes += idx_b
    info["bytes"] = slice_b + bias_b + idx_b
    res.modules.append(info)


def refusal_error(backend: str, refusals: list[Refusal]) -> AttachError:
    first = refusals[0]
    n_more = len({r.entry for r in refusals}) - 1
    more = f" (and {n_more} more entries that do not fold)" if n_more > 0 else ""
    return AttachError(
        f"backend {backend!r} cannot fold {first.entry}: {first.text}{more}. Use backend='auto' to fold what "
        f"folds and run the rest on the fused path, or backend='torch'")


def entry_count(handle, keys) -> int:
    if len(handle.plan_names) != 1:
        return sum(1 for p in handle.plans.values() for e in p.entries if (e.layer, e.site) in set(keys))
    by_key = _entries_by_key(handle)
    return sum(len(by_key.get(k, [])) for k in keys)


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's unique parameters and buffers."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        key = (t.device, t.data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


class FoldBackend(Backend):
    """Folds a single, ungated plan into the weights; refuses (AttachError) anything that does not fold."""

    name = "fold"
    static = True

    @staticmethod
    def support(family) -> str:
        if family.generic:
            return "refused"
        sites = ", ".join(f"`{r.name}`" for r in REGISTRY.values() if r.fold != "bias")
        bias = [f"`{r.name}`" for r in REGISTRY.values() if r.fold == "bias"]
        if family.layout == "pre":
            mult = " (b / residual multiplier into `down_proj`'s bias)" if family.residual_multiplier else ""
            out = f"{sites}, additive {', '.join(bias)}{mult}"
        else:
            out = f"{sites}; {', '.join(bias)} refused (a norm follows `down_proj`)"
        if family.mlp == "moe":
            out += "; sparse layers: `attn.o_proj.in` only (routed experts have no single linear)"
        return out

    def install(self, ctx) -> None:
        handle = ctx.handle
        reasons = fold_reasons(handle)
        refusals = [r for r in reasons.values() if r is not None]
        if refusals:
            raise refusal_error("fold", refusals)
        res = apply_folds(handle, list(reasons))
        self.result = res
        handle.report = {"backend": "fold", **res.as_dict(), "fused": [], "fused_backend": None,
                         "model_bytes": model_bytes(handle.model)}
        log.debug("fold: folded %d entries into %d weights (kept %d bytes for restore)",
                  entry_count(handle, res.keys), len(res.modules), res.restore_bytes)

    def holds_weights(self) -> bool:
        return bool(getattr(self, "result", None) is not None and self.result.modules)

    def on_route(self, handle, ids) -> None:
        if any(i != 1 for i in ids):
            raise AttachError("backend 'fold' folded the plan into the weights, so it applies to every row; "
                              "unsteered rows need backend='auto' or 'torch' (or detach first)")
