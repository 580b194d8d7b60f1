"""The `torch` backend: the maps inlined into the forwards of the modules around each site (no Python hooks).

Every map wraps the forward that is already installed on a module (the class forward, or whatever another
library put on the instance, accelerate's hook wrapper included) instead of re-implementing anything, so the
layer computes exactly what it computes unsteered, and a wrapper or hook set by another library keeps
running where the ``reference`` hooks would see it:

* ``attn.o_proj.in`` / ``mlp.down_proj.in``: the input of ``o_proj`` / ``down_proj`` is mapped, then their
  installed forward runs;
* ``mlp.out``: the output of the MLP's installed forward is mapped;
* ``layer.out``: the output of the decoder layer's installed forward is mapped.

Each steered decoder layer's forward also computes this forward's slots from the positions it receives.
The per-site op is :func:`torch_apply`: identity slots are skipped (bit-exact no-op), additive-only slots
use one add, others one fused ``addcmul``, always in fp32 and rounded once to the activation dtype.
"""

from __future__ import annotations

import torch

from ...formula import affine, shift
from ..compat import layer_positions, merged_kwargs, positional_names
from ..sites import in_layer_order, module_at, site
from ..tables import SiteTable
from ..tp import on_local
from .base import Backend


def torch_apply(x: torch.Tensor, table: SiteTable, router) -> torch.Tensor:
    return on_local(x, lambda x: _torch_apply(x, table, router))


def _torch_apply(x: torch.Tensor, table: SiteTable, router) -> torch.Tensor:
    s = router.host_slot(table)
    if s is not None:  # eager, one plan for every token: skip identities, one add for additive maps
        if table.identity_rows[s]:
            return x
        if table.additive_rows[s]:
            return shift(x, table.rows_b[s])
        return affine(x, table.rows_a[s], table.rows_b[s])
    untouched, additive = router.rows_flags(table)  # eager, several plans: what the host knows of their rows here
    if untouched:
        return x
    slots, rows = router.on(x.device)
    shape = x.shape
    if x.dim() == 3 and shape[0] == router.batch and router.rows_phase_free(table):
        # one slot per batch row: gather [B, 1, W] rows and broadcast over the sequence
        # (index_select: on CPU several times faster than advanced indexing for the same gather)
        b = table.B.index_select(0, rows).unsqueeze(1)
        return shift(x, b) if additive else affine(x, table.A.index_select(0, rows).unsqueeze(1), b)
    flat = x.reshape(-1, shape[-1])
    b = table.B.index_select(0, slots)
    y = shift(flat, b) if additive else affine(flat, table.A.index_select(0, slots), b)
    return y.reshape(shape)



def tables_by_layer(ctx) -> dict[int, dict]:
    """{layer: {site: SiteTable}} of the attached plans."""
    by_layer: dict[int, dict] = {}
    for (layer_idx, name), table in ctx.tables.items():
        by_layer.setdefault(layer_idx, {})[name] = table
    return by_layer


def patch_input(handle, layer_idx: int, module, site: str, table, op) -> None:
    """Patch ``module`` (o_proj or down_proj) so its input goes through ``op(x, table)`` (x or the mapped x)."""
    orig = handle.patcher.original_forward(module)
    check = handle.checker(layer_idx, site)

    def forward(x, *a, **k):
        y = op(x, table)
        return orig(check(y) if y is not x else x, *a, **k)
    handle.patcher.set_forward(module, forward)


def patch_o_proj(handle, layer_idx: int, layer, table, op) -> None:
    """Patch ``self_attn.o_proj`` so its input goes through ``op(x, table)``."""
    patch_input(handle, layer_idx, layer.self_attn.o_proj, "attn.o_proj.in", table, op)


def mapped_output(forward, table, op, check):
    """``forward`` with its output (a tensor, or a tuple whose first item is the hidden states) mapped."""
    def mapped(*a, **k):
        out = forward(*a, **k)
        if isinstance(out, tuple):
            return (check(op(out[0], table)),) + tuple(out[1:])
        return check(op(out, table))
    return mapped


def routed_forward(ctx, layer, forward):
    """Wrap a layer forward so this forward's slots are computed (once) from the positions it receives."""
    names = positional_names(type(layer).forward)
    router = ctx.router

    def wrapped(hidden_states, *args, **kwargs):
        kwargs = merged_kwargs(names, args, kwargs)
        router.prepare(hidden_states, layer_positions(kwargs))
        return forward(hidden_states, **kwargs)
    return wrapped


class TorchBackend(Backend):
    name = "torch"
    apply = staticmethod(torch_apply)

    @staticmethod
    def support(family) -> str:
        return "refused" if family.generic else "✓ inlined into the installed forwards"

    def install(self, ctx) -> None:
        parts, patcher = ctx.parts, ctx.patcher
        router = ctx.router
        apply = self.apply

        def op(x, t):
            return apply(x, t, router)
        for layer_idx, maps in sorted(tables_by_layer(ctx).items()):
            layer = parts.layers[layer_idx]
            for name in in_layer_order(maps):
                rec = site(name)
                if rec.where == "input":  # attn.o_proj.in, mlp.down_proj.in: the input of the module at its path
                    patch_input(ctx, layer_idx, module_at(layer, rec.path), name, maps[name], op)
            if "mlp.out" in maps:
                mlp = layer.mlp
                patcher.set_forward(mlp, mapped_output(patcher.original_forward(mlp), maps["mlp.out"], op,
                                                       ctx.checker(layer_idx, "mlp.out")))
            forward = patcher.original_forward(layer)
            if "layer.out" in maps:
                forward = mapped_output(forward, maps["layer.out"], op, ctx.checker(layer_idx, "layer.out"))
            patcher.set_forward(layer, routed_forward(ctx, layer, forward))
        self._install_stack(ctx)

    def _install_stack(self, ctx) -> None:
        base, patcher = ctx.parts.base, ctx.patcher
        orig = patcher.original_forward(base)

        def stack_forward(*args, **kwargs):
            ctx.begin_forward()
            try:
                out = orig(*args, **kwargs)
            except BaseException:
                ctx.end_forward(failed=True)
                raise
            ctx.end_forward()
            return out

        patcher.set_forward(base, stack_forward)
