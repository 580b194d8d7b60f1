"""The checked contract between fusesteer's patched layer forwards and the transformers release installed.

The fused backends re-run a decoder layer's skeleton around HF's own submodules; that is right only while the
HF layer computes what the family adapter says and passes what fusesteer reads (the token positions). So at
attach, once per (backend, layer class, dtype, device, transformers version) in a process, every distinct
patched layer class runs on a small probe:

1. its inputs are captured from a real call of the decoder stack on 5 tokens;
2. the token positions it receives must be the positions of those tokens;
3. the patched forward with identity maps must equal the original forward (bit-exact for ``torch``; within the
   kernels' tolerance for ``triton``, whose fused norms sum in another order);
4. with one known map at every site (one of them gated to generated tokens) it must equal the ``reference``
   hooks on the same layer.

A mismatch raises :class:`AttachError` naming the family, the layer class and the transformers version.
"""

from __future__ import annotations

import time

import torch

from ..errors import AttachError, ContractError
from ..tolerances import layer_tolerance
from .backends import fused_name
from .compat import (
    TRANSFORMERS_VERSION,
    layer_positions,
    merged_kwargs,
    observe_layer_output,
    positional_names,
)
from .plan import SITES, SteeringPlan
from .probe import PROBE_TOKENS, capture_layer_calls, first_of_each_class

PROBE_PROMPT = 2  # tokens at positions >= 2 count as generated in step 4
_VERIFIED: set = set()


def _fused_name(handle) -> str | None:
    """The patched-forward backend the handle runs (``auto``: the one it fuses with), None for ``fold``."""
    if handle.parts.family.generic:
        return "reference"
    name = handle.backend_name
    if name == "auto":
        return fused_name(handle.model, handle.parts)
    return None if name == "fold" else name


def _out(y):
    return y[0] if isinstance(y, tuple) else y


def _probe_plan(handle, layer: int) -> SteeringPlan:
    plan = SteeringPlan.for_spec(handle.spec)
    for j, site in enumerate(SITES):
        if handle.parts.site_problem(layer, site) is not None:
            continue
        w = handle.spec.site_width(site)
        t = torch.arange(w, dtype=torch.float32)
        plan.add(layer=layer, site=site, a=1 + 0.05 * torch.sin(t + j), b=0.02 * torch.cos(t * 0.7 + j),
                 gating="generated" if site == "layer.out" else "all")
    return plan


def _run(handle, backend: str, plan, route, layer, args, kwargs, raw: bool = False):
    h = type(handle)(handle.model, {"probe": plan}, "probe", backend, check_finite=False, verify=False)
    h.install()
    try:
        h.route_all(route)
        h.set_prompt_length(PROBE_PROMPT)
        h.router.reset()
        with torch.no_grad():
            y = layer(*args, **kwargs)
            return y if raw else _out(y)
    finally:
        h.router.reset()
        h.detach()


def _fail(handle, cls, backend: str, what: str) -> AttachError:
    fam = handle.parts.family.name
    return ContractError(
        f"the {backend!r} backend does not reproduce {cls.__name__} (family {fam!r}) under transformers "
        f"{TRANSFORMERS_VERSION}: {what}. The layer's calling convention or computation is not what the {fam} "
        f"adapter expects, so steering would be wrong; attach with backend='reference' (hooks), pin a "
        f"transformers release the suite passes on, or report this")


def _compare(got, want, atol: float, rtol: float) -> float | None:
    """max |got - want| when it exceeds the tolerance (or shapes differ), else None."""
    if got.shape != want.shape:
        return float("inf")
    d = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    bound = atol + rtol * (want.float().abs().max().item() if want.numel() else 0.0)
    return d if d > bound or d != d else None


def verify_contract(handle) -> float:
    """Run the probe for every distinct patched layer class not verified yet; returns the milliseconds spent."""
    backend = _fused_name(handle)
    if backend is None:
        return 0.0
    t0 = time.perf_counter()
    parts = handle.parts
    todo = {}
    for i, cls in first_of_each_class(parts.layers).items():
        layer = parts.layers[i]
        p = next(layer.parameters(), None)
        key = (backend, cls, type(getattr(layer, "mlp", None)), p.dtype if p is not None else None,
               p.device.type if p is not None else None, parts.family.name, TRANSFORMERS_VERSION)
        if key not in _VERIFIED:
            todo[i] = (cls, key)
    if not todo:
        return 0.0
    device = parts.model.get_input_embeddings().weight.device
    captured = capture_layer_calls(parts, sorted(todo), device)
    for i, (cls, key) in sorted(todo.items()):
        if i not in captured:
            raise _fail(handle, cls, backend, f"layer {i} was not called by the decoder stack on a probe input")
        args, kwargs = captured[i]
        layer = parts.layers[i]
        names = positional_names(type(layer).forward)
        pos = layer_positions(merged_kwargs(names, args[1:], kwargs))
        if pos is None:
            raise _fail(handle, cls, backend, "the layer received no position_ids (nor cache_position)")
        want_pos = torch.arange(PROBE_TOKENS, device=pos.device)
        if pos.shape[-1] != PROBE_TOKENS or not bool((pos.reshape(-1, pos.shape[-1]) == want_pos).all()):
            raise _fail(handle, cls, backend, f"the position_ids it received ({pos.tolist()}) are not the token "
                                              f"positions 0..{PROBE_TOKENS - 1}")
        dtype = args[0].dtype
        atol, rtol = layer_tolerance(backend, dtype)
        with torch.no_grad():
            raw = layer(*args, **kwargs)
        observe_layer_output(cls, raw)
        original = _out(raw)
        plan = _probe_plan(handle, i)
        ident_raw = _run(handle, backend, plan, None, layer, args, kwargs, raw=True)
        if isinstance(ident_raw, tuple) != isinstance(raw, tuple):
            kind = {True: "a tuple", False: "a tensor"}
            raise _fail(handle, cls, backend, f"the patched forward returns {kind[isinstance(ident_raw, tuple)]} where "
                                              f"the HF layer returns {kind[isinstance(raw, tuple)]}")
        ident = _out(ident_raw)
        d = _compare(ident, original, atol, rtol)
        if d is not None:
            raise _fail(handle, cls, backend, f"with identity maps its output differs from the original forward "
                                              f"(max |delta| = {d:.3g})")
        mapped = _run(handle, backend, plan, "probe", layer, args, kwargs)
        if backend != "reference":
            ref = _run(handle, "reference", plan, "probe", layer, args, kwargs)
            ratol, rrtol = layer_tolerance(backend, dtype)
            d = _compare(mapped, ref, max(ratol, 1e-6 if dtype == torch.float32 else 0.0), max(rrtol, 1e-6))
            if d is not None:
                raise _fail(handle, cls, backend, f"with a known map at every site its output differs from the "
                                                  f"reference hooks (max |delta| = {d:.3g})")
        elif _compare(mapped, original, 0.0, 0.0) is None:
            raise _fail(handle, cls, backend, "a known map at every site left the layer output unchanged")
        _VERIFIED.add(key)
    return (time.perf_counter() - t0) * 1e3
