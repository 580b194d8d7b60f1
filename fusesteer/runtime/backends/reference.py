"""The `reference` backend: plain PyTorch hooks applying x' = a*x + b in fp32 (the oracle).

Obviously right, deliberately simple: every hook gathers the per-token (a, b) from the plan table and
computes ``addcmul(B[slot], A[slot], x.float()).to(x.dtype)`` (b + a*x in fp32). Every other backend is tested
against it.
"""

from __future__ import annotations

import torch

from ...formula import affine
from ..compat import layer_positions, merged_kwargs, positional_names
from ..sites import hook_site
from ..sites import site as site_record
from ..tables import SiteTable
from ..tp import on_local
from .base import Backend


def reference_apply(x: torch.Tensor, table: SiteTable, router) -> torch.Tensor:
    return on_local(x, lambda x: _reference_apply(x, table, router))


def _reference_apply(x: torch.Tensor, table: SiteTable, router) -> torch.Tensor:
    shape = x.shape
    slots = router.on(x.device)[0].to(torch.long)  # one slot per token, computed from its position
    y = affine(x.reshape(-1, shape[-1]), table.A[slots], table.B[slots])
    return y.reshape(shape)


class ReferenceBackend(Backend):
    name = "reference"

    @staticmethod
    def support(family) -> str:
        return "✓ hooks, unverified (one warning names what)" if family.generic else "✓ hooks (the oracle)"

    def install(self, ctx) -> None:
        parts, patcher = ctx.parts, ctx.patcher
        for layer_idx in sorted({k[0] for k in ctx.tables}):
            layer = parts.layers[layer_idx]

            def route_pre(mod, args, kwargs, names=positional_names(type(layer).forward)):
                ctx.router.prepare(args[0] if args else kwargs["hidden_states"],
                                      layer_positions(merged_kwargs(names, args[1:], kwargs)))
                return None
            patcher.add_hook(layer.register_forward_pre_hook(route_pre, with_kwargs=True))
        for (layer_idx, site), table in ctx.tables.items():
            check = ctx.checker(layer_idx, site)
            output = site_record(site).where == "output"  # an output map runs before the module's other hooks
            patcher.add_hook(hook_site(parts.layers[layer_idx], site,
                                       lambda x, table=table, check=check: check(
                                           reference_apply(x, table, ctx.router)), first=output))

        def stack_pre(mod, args, kwargs):
            ctx.begin_forward()
            return None

        def stack_post(mod, args, kwargs, out):
            ctx.end_forward(failed=out is None)  # always_call: out is None when the forward raised
            return None

        patcher.add_hook(parts.base.register_forward_pre_hook(stack_pre, with_kwargs=True))
        patcher.add_hook(parts.base.register_forward_hook(stack_post, with_kwargs=True, always_call=True))
