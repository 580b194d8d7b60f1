"""The `torch` backend: patched decoder-layer forwards with the maps inlined (no Python hooks).

One class-agnostic layer skeleton, parameterised by the family adapter (pre-norm Llama/Qwen layout or
Gemma's sandwich norms). It calls the HF submodules (norms, attention, gate/up/down projections, act_fn),
so attention variants, KV caches, quantized linears and output recording keep working, and applies the
maps where the sites are: o_proj input, GLU activation (down_proj input), MLP output, layer output.

The per-site op is :func:`torch_apply`: identity slots are skipped (bit-exact no-op), additive-only slots
use one add, others one fused ``addcmul``, always in fp32 and rounded once to the activation dtype.
"""

from __future__ import annotations

import inspect

import torch

from ..tables import SiteTable


def torch_apply(x: torch.Tensor, table: SiteTable, router) -> torch.Tensor:
    s = router.uniform_slot
    if s is not None:
        if table.identity_rows[s]:
            return x
        a, b = table.rows_a[s], table.rows_b[s]
        if x.dtype == torch.float32:
            return x + b if table.additive_rows[s] else torch.addcmul(b, x, a)
        xf = x.float()
        y = xf + b if table.additive_rows[s] else torch.addcmul(b, xf, a)
        return y.to(x.dtype)
    shape = x.shape
    rs = router.row_slots
    if rs is not None and x.dim() == 3 and shape[0] == router.batch:
        # one slot per batch row: gather [B, 1, W] rows and broadcast over the sequence
        y = torch.addcmul(table.B[rs].unsqueeze(1), x.float(), table.A[rs].unsqueeze(1))
        return y.to(x.dtype)
    slots = router.slots
    xf = x.reshape(-1, shape[-1]).float()
    y = torch.addcmul(table.B[slots], xf, table.A[slots])
    return y.to(x.dtype).reshape(shape)


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


def _positional_names(fn) -> list[str]:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names[1:]  # drop hidden_states


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
        names = _positional_names(type(layer).forward)
        router = handle.router
        apply = self.apply
        c_down = handle.checker(layer_idx, "mlp.down_proj.in")
        c_mout = handle.checker(layer_idx, "mlp.out")
        c_out = handle.checker(layer_idx, "layer.out")

        def forward(hidden_states, *args, **kwargs):
            if args:
                kwargs.update(zip(names, args))
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

        return forward

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
        self._install_stack(handle)

    def _install_stack(self, handle) -> None:
        base, patcher = handle.parts.base, handle.patcher
        orig = patcher.original_forward(base)

        def stack_forward(*args, **kwargs):
            handle._begin_forward(args, kwargs)
            try:
                return orig(*args, **kwargs)
            finally:
                handle._end_forward()

        patcher.set_forward(base, stack_forward)
