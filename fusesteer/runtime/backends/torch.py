"""The `torch` backend: patched decoder-layer forwards with the maps inlined (no Python hooks).

The layer skeleton of :mod:`.skeleton` with torch ops (:class:`TorchOps`), parameterised by the family adapter
(pre-norm Llama/Qwen layout or Gemma's sandwich norms). It calls the HF submodules (norms, attention, gate/up/down projections, act_fn),
so attention variants, KV caches, quantized linears and output recording keep working, and applies the
maps where the sites are: o_proj input, GLU activation (down_proj input), MLP output, layer output.

The per-site op is :func:`torch_apply`: identity slots are skipped (bit-exact no-op), additive-only slots
use one add, others one fused ``addcmul``, always in fp32 and rounded once to the activation dtype.
"""

from __future__ import annotations

import torch

from .base import Backend
from ..compat import layer_positions, merged_kwargs, positional_names
from ..families import layer_modules
from ..tables import SiteTable, affine
from .skeleton import layer_forward


def torch_apply(x: torch.Tensor, table: SiteTable, router) -> torch.Tensor:
    s = router.host_slot(table)
    if s is not None:  # eager, one plan for every token: skip identities, one add for additive maps
        if table.identity_rows[s]:
            return x
        if table.additive_rows[s]:
            return x + table.rows_b[s] if x.dtype == torch.float32 else (x.float() + table.rows_b[s]).to(x.dtype)
        return affine(x, table.rows_a[s], table.rows_b[s])
    slots, rows = router.on(x.device)
    shape = x.shape
    if x.dim() == 3 and shape[0] == router.batch and router.rows_phase_free(table):
        # one slot per batch row: gather [B, 1, W] rows and broadcast over the sequence
        return affine(x, table.A[rows].unsqueeze(1), table.B[rows].unsqueeze(1))
    y = affine(x.reshape(-1, shape[-1]), table.A[slots], table.B[slots])
    return y.reshape(shape)


def tables_by_layer(ctx) -> dict[int, dict]:
    """{layer: {site: SiteTable}} of the attached plans."""
    by_layer: dict[int, dict] = {}
    for (layer_idx, site), table in ctx.tables.items():
        by_layer.setdefault(layer_idx, {})[site] = table
    return by_layer


def patch_o_proj(ctx, layer_idx: int, layer, table, op) -> None:
    """Patch ``self_attn.o_proj`` so its input goes through ``op(x, table)`` (returns x or the mapped x)."""
    o_proj = layer.self_attn.o_proj
    orig = ctx.patcher.original_forward(o_proj)
    check = ctx.checker(layer_idx, "attn.o_proj.in")

    def o_forward(x, *a, **k):
        y = op(x, table)
        return orig(check(y) if y is not x else x, *a, **k)
    ctx.patcher.set_forward(o_proj, o_forward)


def routed_forward(ctx, layer, forward):
    """Wrap a layer forward so this forward's slots are computed (once) from the positions it receives."""
    names = positional_names(type(layer).forward)
    router = ctx.router

    def wrapped(hidden_states, *args, **kwargs):
        kwargs = merged_kwargs(names, args, kwargs)
        router.prepare(hidden_states, layer_positions(kwargs))
        return forward(hidden_states, **kwargs)
    return wrapped


class TorchOps:
    """The torch ops of the layer skeleton: HF submodules in HF's order, maps inlined where the sites are."""

    def __init__(self, ctx, layer_idx: int, modules, maps: dict, apply):
        self.modules, self.apply, self.router = modules, apply, ctx.router
        self.t_down, self.t_mout, self.t_out = (maps.get(s) for s in ("mlp.down_proj.in", "mlp.out", "layer.out"))
        self.c_down, self.c_mout, self.c_out = (ctx.checker(layer_idx, s)
                                                for s in ("mlp.down_proj.in", "mlp.out", "layer.out"))

    def attn_input(self, x):
        return self.modules.in_norm(x)

    def mid(self, x, h):
        m = self.modules
        if m.post_attn is not None:
            h = m.post_attn(h)
        s = x + h
        return s, m.ffn_norm(s)

    def mlp(self, n):
        m = self.modules
        if self.t_down is not None:
            g = m.act(m.gate(n)) * m.up(n)
            d = m.down(self.c_down(self.apply(g, self.t_down, self.router)))
        else:
            d = m.mlp(n)
        if self.t_mout is not None:
            d = self.c_mout(self.apply(d, self.t_mout, self.router))
        return d

    def end(self, s, d):
        if self.modules.post_ffn is not None:
            d = self.modules.post_ffn(d)
        s = s + d
        if self.t_out is not None:
            s = self.c_out(self.apply(s, self.t_out, self.router))
        return s


class TorchBackend(Backend):
    name = "torch"
    apply = staticmethod(torch_apply)

    def make_layer_forward(self, ctx, layer_idx: int, layer, maps: dict):
        ops = TorchOps(ctx, layer_idx, layer_modules(ctx.parts.family, layer), maps, self.apply)
        return routed_forward(ctx, layer, layer_forward(ops))

    def install(self, ctx) -> None:
        parts, patcher = ctx.parts, ctx.patcher
        router = ctx.router
        apply = self.apply
        for layer_idx, maps in sorted(tables_by_layer(ctx).items()):
            layer = parts.layers[layer_idx]
            t_attn = maps.get("attn.o_proj.in")
            if t_attn is not None:
                patch_o_proj(ctx, layer_idx, layer, t_attn, lambda x, t: apply(x, t, router))
            if any(s in maps for s in ("mlp.down_proj.in", "mlp.out", "layer.out")):
                patcher.set_forward(layer, self.make_layer_forward(ctx, layer_idx, layer, maps))
            else:  # only o_proj is patched: the layer still routes this forward from its positions
                patcher.set_forward(layer, routed_forward(ctx, layer, patcher.original_forward(layer)))
        self._install_stack(ctx)

    def _install_stack(self, ctx) -> None:
        base, patcher = ctx.parts.base, ctx.patcher
        orig = patcher.original_forward(base)

        def stack_forward(*args, **kwargs):
            ctx.begin_forward()
            try:
                return orig(*args, **kwargs)
            finally:
                ctx.end_forward()

        patcher.set_forward(base, stack_forward)
