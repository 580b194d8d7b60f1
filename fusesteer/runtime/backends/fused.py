"""The `torch` backend: patched decoder-layer forwards with the maps inlined (no Python hooks).

One class-agnostic layer skeleton, parameterised by the family adapter (pre-norm Llama/Qwen layout or
Gemma's sandwich norms). It calls the HF submodules (norms, attention, gate/up/down projections, act_fn),
so attention variants, KV caches, quantized linears and output recording keep working, and applies the
maps where the sites are: o_proj input, GLU activation (down_proj input), MLP output, layer output.

The per-site op is :func:`torch_apply`: identity slots are skipped (bit-exact no-op), additive-only slots
use one add, others one fused ``addcmul``, always in fp32 and rounded once to the activation dtype.
"""

from __future__ import annotations

import torch

from ..compat import layer_positions, merged_kwargs, positional_names
from ..tables import SiteTable, affine


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


def tables_by_layer(handle) -> dict[int, dict]:
    """{layer: {site: SiteTable}} of the attached plans."""
    by_layer: dict[int, dict] = {}
    for (layer_idx, site), table in handle.tables.items():
        by_layer.setdefault(layer_idx, {})[site] = table
    return by_layer


def patch_o_proj(handle, layer_idx: int, layer, table, op) -> None:
    """Patch ``self_attn.o_proj`` so its input goes through ``op(x, table)`` (returns x or the mapped x)."""
    o_proj = layer.self_attn.o_proj
    orig = handle.patcher.original_forward(o_proj)
    check = handle.checker(layer_idx, "attn.o_proj.in")

    def o_forward(x, *a, **k):
        y = op(x, table)
        return orig(check(y) if y is not x else x, *a, **k)
    handle.patcher.set_forward(o_proj, o_forward)


def routed_forward(handle, layer, forward):
    """Wrap a layer forward so this forward's slots are computed (once) from the positions it receives."""
    names = positional_names(type(layer).forward)
    router = handle.router

    def wrapped(hidden_states, *args, **kwargs):
        kwargs = merged_kwargs(names, args, kwargs)
        router.prepare(hidden_states, layer_positions(kwargs))
        return forward(hidden_states, **kwargs)
    return wrapped


class TorchBackend:
    name = "torch"
    apply = staticmethod(torch_apply)

    def make_layer_forward(self, handle, layer_idx: int, layer, maps: dict):
        fam = handle.parts.family
        attn, mlp = layer.self_attn, layer.mlp
        in_norm = getattr(layer, fam.pre_attn_norm)
        ffn_norm = getattr(layer, fam.pre_ffn_norm)
        post_attn = getattr(layer, fam.post_attn_norm) if fam.post_attn_norm else None
        post_ffn = getattr(layer, fam.post_ffn_norm) if fam.post_ffn_norm else None
        gate, up, down, act = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        t_down = maps.get("mlp.down_proj.in")
        t_mout = maps.get("mlp.out")
        t_out = maps.get("layer.out")
        router = handle.router
        apply = self.apply
        c_down = handle.checker(layer_idx, "mlp.down_proj.in")
        c_mout = handle.checker(layer_idx, "mlp.out")
        c_out = handle.checker(layer_idx, "layer.out")

        def forward(hidden_states, **kwargs):
            residual = hidden_states
            h = in_norm(hidden_states)
            h, _ = attn(hidden_states=h, **kwargs)
            if post_attn is not None:
                h = post_attn(h)
            h = residual + h
            residual = h
            h = ffn_norm(h)
            if t_down is not None:
                m = act(gate(h)) * up(h)
                h = down(c_down(apply(m, t_down, router)))
            else:
                h = mlp(h)
            if t_mout is not None:
                h = c_mout(apply(h, t_mout, router))
            if post_ffn is not None:
                h = post_ffn(h)
            h = residual + h
            if t_out is not None:
                h = c_out(apply(h, t_out, router))
            return h

        return routed_forward(handle, layer, forward)

    def install(self, handle) -> None:
        parts, patcher = handle.parts, handle.patcher
        router = handle.router
        apply = self.apply
        for layer_idx, maps in sorted(tables_by_layer(handle).items()):
            layer = parts.layers[layer_idx]
            t_attn = maps.get("attn.o_proj.in")
            if t_attn is not None:
                patch_o_proj(handle, layer_idx, layer, t_attn, lambda x, t: apply(x, t, router))
            if any(s in maps for s in ("mlp.down_proj.in", "mlp.out", "layer.out")):
                patcher.set_forward(layer, self.make_layer_forward(handle, layer_idx, layer, maps))
            else:  # only o_proj is patched: the layer still routes this forward from its positions
                patcher.set_forward(layer, routed_forward(handle, layer, patcher.original_forward(layer)))
        self._install_stack(handle)

    def _install_stack(self, handle) -> None:
        base, patcher = handle.parts.base, handle.patcher
        orig = patcher.original_forward(base)

        def stack_forward(*args, **kwargs):
            handle._begin_forward()
            try:
                return orig(*args, **kwargs)
            finally:
                handle._end_forward()

        patcher.set_forward(base, stack_forward)
