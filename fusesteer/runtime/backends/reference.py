"""The `reference` backend: plain PyTorch hooks applying x' = a*x + b in fp32 (the oracle).

Obviously right, deliberately simple: every hook gathers the per-token (a, b) from the plan table and
computes ``addcmul(B[slot], A[slot], x.float()).to(x.dtype)`` (b + a*x in fp32). Every other backend is tested against it.
"""

from __future__ import annotations

import torch

from ..tables import SiteTable


def reference_apply(x: torch.Tensor, table: SiteTable, router) -> torch.Tensor:
    shape = x.shape
    xf = x.reshape(-1, shape[-1]).to(torch.float32)
    if router.uniform_slot is not None:
        slots = torch.full((xf.shape[0],), router.uniform_slot, dtype=torch.long, device=x.device)
    else:
        slots = router.slots.to(device=x.device, dtype=torch.long)
    a = table.A[slots]
    b = table.B[slots]
    y = torch.addcmul(b, a, xf)  # b + a*x in fp32, one rounding (as a fused multiply-add would)
    return y.to(x.dtype).reshape(shape)


class ReferenceBackend:
    name = "reference"

    def install(self, handle) -> None:
        parts, patcher = handle.parts, handle.patcher
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
            handle._begin_forward(args, kwargs)
            return None

        def stack_post(mod, args, kwargs, out):
            handle._end_forward()
            return None

        patcher.add_hook(parts.base.register_forward_pre_hook(stack_pre, with_kwargs=True))
        patcher.add_hook(parts.base.register_forward_hook(stack_post, with_kwargs=True, always_call=True))
