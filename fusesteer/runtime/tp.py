"""Tensor parallelism (transformers' ``tp_plan``): which slice of a site each rank holds, read from the model.

Under ``from_pretrained(..., tp_plan="auto")`` transformers shards a Llama-like layer's linears as DTensor
parameters: ``o_proj`` / ``down_proj`` rowwise (weight ``Shard`` on its input dim, so their *inputs*, the sites
``attn.o_proj.in`` and ``mlp.down_proj.in``, are this rank's heads / columns), everything after the all-reduce
replicated (``mlp.out``, ``layer.out``). Plans stay full width; each rank's tables hold its slice of the sharded
sites and the whole vector of the replicated ones, so nothing about a plan moves between ranks per forward.

The facts come from the parameters themselves (DTensor placements, device mesh, local shapes), checked at
attach: a layout this module does not understand is an :class:`AttachError`, never a guess. Plans move
between ranks as plan-file bytes through torch.distributed tensors (:func:`broadcast_plan`) and the same
bounded loader as files (never pickle).
"""

from __future__ import annotations

import math

import torch

from ..errors import AttachError
from .sites import module_at, site

_DTENSOR: tuple | None = None  # (DTensor, Replicate, Shard), imported once: every steered site asks


def _dtensor_types():
    global _DTENSOR
    if _DTENSOR is None:
        try:
            from torch.distributed.tensor import DTensor, Replicate, Shard
        except ImportError:  # pragma: no cover - torch without distributed tensors: nothing is a DTensor
            _DTENSOR = ()
        else:
            _DTENSOR = (DTensor, Replicate, Shard)
    return _DTENSOR or None


def is_dtensor(t) -> bool:
    types = _dtensor_types()
    return types is not None and isinstance(t, types[0])


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (a DTensor's local shard, which shares its storage; else ``t`` itself)."""
    return t.to_local() if is_dtensor(t) else t


def on_local(x: torch.Tensor, fn):
    """``fn`` applied to what this rank holds of ``x``: a DTensor activation (transformers releases that hand a
    rowwise linear a DTensor input) is mapped on its local shard and wrapped back with the same layout."""
    if not is_dtensor(x):
        return fn(x)
    y = fn(x.to_local())
    return type(x).from_local(y, x.device_mesh, x.placements, run_check=False, shape=x.shape, stride=x.stride())


def is_parallel(model) -> bool:
    """Whether any parameter of ``model`` is a DTensor (transformers' tensor parallelism)."""
    return any(is_dtensor(p) for p in model.parameters())


def own_parallel_forward(module) -> bool:
    """Whether ``module``'s own parameters are DTensors: its instance-level forward is then transformers'
    tensor-parallel wrapper (layouts and the all-reduce), which fusesteer wraps like any installed forward."""
    return any(is_dtensor(p) for p in module.parameters(recurse=False))


def site_shard(layer_module, layer: int, name: str) -> slice | None:
    """The columns of site ``name``'s full width this rank holds, or None (the whole vector: not parallel, or
    replicated). Input sites live at the input of a linear; sharded means its weight is ``Shard`` on the input
    dim over a one-dimensional mesh."""
    rec = site(name)
    if rec.where != "input":
        return None
    mod = module_at(layer_module, rec.path)
    w = getattr(mod, "weight", None)
    if not is_dtensor(w):
        return None
    DTensor, Replicate, Shard = _dtensor_types()
    where = f"layer {layer}, site {name!r} ({type(mod).__name__}.weight placements {tuple(w.placements)})"
    if w.device_mesh.ndim != 1 or len(w.placements) != 1:
        raise AttachError(f"tensor parallelism: {where}: fusesteer understands a one-dimensional device mesh only")
    pl = w.placements[0]
    if isinstance(pl, Replicate):
        return None
    if not (isinstance(pl, Shard) and pl.dim in (1, -1)):
        raise AttachError(f"tensor parallelism: {where}: the input of this linear is not sharded by columns "
                          f"(rowwise), so fusesteer cannot tell which slice of the site this rank sees")
    n, size = w.shape[-1], w.device_mesh.size(0)
    rank = w.device_mesh.get_coordinate()[0]
    chunk = math.ceil(n / size)  # torch.chunk semantics, as DTensor shards
    lo, hi = min(n, rank * chunk), min(n, (rank + 1) * chunk)
    if hi - lo != w.to_local().shape[-1]:
        raise AttachError(f"tensor parallelism: {where}: rank {rank} holds {w.to_local().shape[-1]} columns, not the "
                          f"{hi - lo} an even split of {n} over {size} ranks gives")
    return slice(lo, hi)


def shards(parts, keys) -> dict:
    """{(layer, site): slice} for the sharded keys among ``keys`` (the others hold the whole vector)."""
    out = {}
    for layer, name in keys:
        s = site_shard(parts.layers[layer], layer, name)
        if s is not None:
            out[(layer, name)] = s
    return out


def gather_last_dim(x: torch.Tensor, shard: slice, width: int) -> torch.Tensor:
    """Every rank's slice of the last dimension, concatenated in rank order: the full-width activation (one
    all-gather; every rank must call it, in the same order, as every rank runs the same forward)."""
    import torch.distributed as dist

    if is_dtensor(x):
        return x.full_tensor()
    size = dist.get_world_size()
    chunk = math.ceil(width / size)
    pad = chunk - x.shape[-1]
    xs = torch.nn.functional.pad(x.contiguous(), (0, pad)) if pad else x.contiguous()
    parts = [torch.empty_like(xs) for _ in range(size)]
    dist.all_gather(parts, xs)
    return torch.cat(parts, dim=-1)[..., :width]


def broadcast_plan(plan, src: int = 0, group=None):
    """``plan`` (a SteeringPlan on rank ``src``; ignored elsewhere) on every rank: its plan-file bytes are
    broadcast as a uint8 tensor and read back by the bounded plan loader (no pickle). Collective."""
    import torch.distributed as dist

    from .plan import SteeringPlan

    rank = dist.get_rank(group)
    backend = dist.get_backend(group)
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    if rank == src:
        if not isinstance(plan, SteeringPlan):
            raise AttachError(f"broadcast_plan: rank {src} must pass a SteeringPlan, got {type(plan).__name__}")
        data = torch.frombuffer(bytearray(plan.to_bytes()), dtype=torch.uint8).to(dev)
        n = torch.tensor([data.numel()], dtype=torch.int64, device=dev)
    else:
        n = torch.zeros(1, dtype=torch.int64, device=dev)
    dist.broadcast(n, src, group=group)
    if rank != src:
        data = torch.empty(int(n.item()), dtype=torch.uint8, device=dev)
    dist.broadcast(data, src, group=group)
    return plan if rank == src else SteeringPlan.from_bytes(bytes(data.cpu().numpy()), source=f"<rank {src}>")
