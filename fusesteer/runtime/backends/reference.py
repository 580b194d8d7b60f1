"""The `reference` backend: plain PyTorch hooks applying x' = a*x + b in fp32 (the oracle).

Obviously right, deliberately simple: every hook gathers the per-token (a, b) from the plan table and
computes ``addcmul(B[slot], A[slot], x.float()).to(x.dtype)`` (b + a*x in fp32). Every other backend is tested against it.
"""

from __future__ import annotations

import torch

from ..compat import layer_positions, merged_kwargs, positional_names
from ..tables import SiteTable, affine


def reference_apply(x: torch.Tensor, table: SiteTable, router) -> torch.Tensor:
    shape = x.shape
    slots = router.on(x.device)[0].to(torch.long)  # one slot per token, computed from its position
    y = affine(x.reshape(-1, shape[-1]), table.A[slots], table.B[slots])
    return y.reshape(shape)


class ReferenceBackend:
    name = "reference"

    def install(self, handle) -> None:
        parts, patcher = handle.parts, handle.patcher
        for layer_idx in sorted({k[0] for k in handle.tables}):
            layer = parts.layers[layer_idx]

            def route_pre(mod, args, kwargs, names=positional_names(type(layer).forward)):
                handle.router.prepare(args[0] if args else kwargs["hidden_states"],
                                      layer_positions(merged_kwargs(names, args[1:], kwargs)))
                return None
            patcher.add_hook(layer.register_forward_pre_hook(route_pre, with_kwargs=True))
        for (layer_idx, site), table in handle.tables.items():
            layer = parts.layers[layer_idx]
            check = handle.checker(layer_idx, site)
            if site == "layer.out":
                def hook(mod, args, out, table=table, check=check):
                    if isinstance(out, tuple):
                        return (check(reference_apply(out[0], table, handle.router)),) + tuple(out[1:])
                    return check(reference_apply(out, table, handle.router))
                patcher.add_hook(layer.register_forward_hook(hook))
            elif site == "mlp.out":
                def hook(mod, args, out, table=table, check=check):
                    return check(reference_apply(out, table, handle.router))
                patcher.add_hook(layer.mlp.register_forward_hook(hook))
            else:
                mod = layer.self_attn.o_proj if site == "attn.o_proj.in" else layer.mlp.down_proj

                def pre(mod, args, kwargs, table=table, check=check):
                    if args:
                        return (check(reference_apply(args[0], table, handle.router)),) + tuple(args[1:]), kwargs
                    x = kwargs.pop("input")
                    kwargs["input"] = check(reference_apply(x, table, handle.router))
                    return args, kwargs
                patcher.add_hook(mod.register_forward_pre_hook(pre, with_kwargs=True))

        def stack_pre(mod, args, kwargs):
            handle._begin_forward()
            return None

        def stack_post(mod, args, kwargs, out):
            handle._end_forward(failed=out is None)  # always_call: out is None when the forward raised
            return None

        patcher.add_hook(parts.base.register_forward_pre_hook(stack_pre, with_kwargs=True))
        patcher.add_hook(parts.base.register_forward_hook(stack_post, with_kwargs=True, always_call=True))
