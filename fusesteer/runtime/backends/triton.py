"""The `triton` backend: patched decoder-layer forwards calling the fused kernels of fusesteer.kernels.

Every layer is patched (not only the steered ones) so the residual stream is carried as
``(residual, normed)`` between layers, vLLM/Liger style:

* the block's final residual add, the ``layer.out`` map and the *next* layer's input RMSNorm run as one
  kernel (``add_map_rmsnorm``); the last layer fuses into the model's final norm;
* the mid-block add (after attention) fuses with the pre-FFN norm (Gemma: post-attention norm -> add ->
  pre-feedforward norm, all in one pass);
* the GLU activation fuses with the ``mlp.down_proj.in`` map (``glu_map``);
* ``attn.o_proj.in`` and ``mlp.out`` maps use the elementwise ``affine_map`` kernel.

A layer returns the real residual tensor ``s`` (so output_hidden_states and foreign readers see the right
values) and stashes ``rmsnorm(s)`` for the next consumer, which uses it only if it receives that very tensor
unmodified (identity and version counter checked) and nothing sits on that norm module (an instance-level
forward or hooks of another library); otherwise it recomputes the norm with the HF module. The MLP and the
mid-block norms are never called as modules, so attach refuses a model where another library has put a
forward wrapper or hooks on them (the ``torch`` backend keeps those), and so does a forward that finds hooks
added there later.
Maps are read from the persistent plan tables by per-token slot index, so changing values never recompiles.
On CPU without ``TRITON_INTERPRET=1`` the ops fall back to their torch references (same math).
"""

from __future__ import annotations

import torch

from ...errors import AttachError
from ...kernels import add_map_rmsnorm, affine_map, glu_map
from ..compat import layer_returns_tuple
from ..families import layer_modules
from ..patching import foreign_forward, foreign_hooks
from ..probe import observe_conventions
from ..tables import SiteTable
from ..tp import on_local
from .base import Backend
from .skeleton import layer_forward
from .torch import patch_o_proj, routed_forward, tables_by_layer


def _norm_eps(norm) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    raise AttributeError(f"cannot find eps on {type(norm).__name__}")


def _hooks_between(producer, consumer) -> bool:
    """True when a forward hook of ``producer`` or a pre-hook of ``consumer`` (or a global one) could edit the
    carried tensor in place between the two."""
    from torch.nn.modules import module as _m

    return bool(producer._forward_hooks or consumer._forward_pre_hooks or _m._global_forward_hooks
                or _m._global_forward_pre_hooks)


class _Stash:
    """The carried ``rmsnorm(s)`` of the last layer's output ``s``, for the next consumer.

    It is used only when the consumer receives that very tensor, unmodified: same object, same version
    counter, and (inference tensors have no version counter) no hook that could have edited it in place.
    Under torch.compile nothing is carried: the consumer recomputes the norm and the compiler fuses it.
    """

    __slots__ = ("s", "version", "normed", "producer")

    def __init__(self):
        self.clear()

    @staticmethod
    def _ver(t):
        return -2 if t.is_inference() else t._version

    def put(self, s, normed, producer):
        if torch.compiler.is_compiling():
            return
        self.s, self.version, self.normed, self.producer = s, self._ver(s), normed, producer

    def take(self, x, consumer, norm):
        """The carried norm of ``x`` for ``consumer``, whose norm module is ``norm``; None: compute it."""
        if torch.compiler.is_compiling() or self.s is None or x is not self.s:
            return None
        n, producer, version = self.normed, self.producer, self.version
        self.clear()
        if self._ver(x) != version:
            return None
        if version == -2 and _hooks_between(producer, consumer):
            return None
        if foreign_forward(norm, skipped=True) is not None:  # another library's wrapper/hooks on the norm
            return None
        return n

    def clear(self):
        self.s = self.normed = self.producer = None
        self.version = -1


class _SlotCache:
    """Per-forward (a_tab, b_tab, slot) arguments for a table, or None when the op is the identity."""

    def __init__(self, router):
        self.router = router
        self._zeros: dict = {}

    def args(self, table: SiteTable | None, rows: int, device):
        if table is None:
            return None, None, None
        s = self.router.host_slot(table)
        if s is not None:
            if table.identity_rows[s]:
                return None, None, None
            key = (rows, device)
            z = self._zeros.get(key)
            if z is None:
                if len(self._zeros) > 32:
                    self._zeros.clear()
                z = self._zeros[key] = torch.zeros(rows, dtype=torch.int32, device=device)
            return table.A[s:s + 1], table.B[s:s + 1], z
        return table.A, table.B, self.router.on(device)[0]


class TritonBackend(Backend):
    name = "triton"

    @staticmethod
    def support(family) -> str:
        if family.generic:
            return "refused"
        if family.layout == "post":
            return ("fused: post-norm + residual add (+ `layer.out` map), GLU + `mlp.down_proj.in` map; "
                    "`attn.o_proj.in` / `mlp.out` elementwise")
        what = "post-norm + add + next norm" if family.layout == "sandwich" else "add + norm (+ `layer.out` map)"
        extra = {"fused_glu": "; GLU reads the two halves of `gate_up_proj`",
                 "moe": "; sparse layers call the HF expert block and its router-input norm (an ulp there can flip "
                        "an expert), `mlp.out` elementwise"}.get(family.mlp, "")
        mult = "; the residual multiplier is one elementwise multiply before the fused add" \
            if family.residual_multiplier else ""
        return f"fused: {what}, GLU + `mlp.down_proj.in` map{extra}{mult}"

    def check(self, handle) -> None:
        if handle.tables:
            self._refuse_bypassed(handle.parts)
            self.refuse_reordered(handle.parts, handle.tables)

    @staticmethod
    def refuse_reordered(parts, tables) -> None:
        """AttachError for another library's hooks that would run on the other side of a map than they do with
        the ``reference`` hooks: forward pre-hooks on a ``down_proj`` whose input map the fused GLU kernel applies
        before calling it (the reference applies it after them, as the input ``down_proj``'s forward gets), and
        forward hooks on a sparse MoE block whose ``mlp.out`` map runs after calling it (the reference's runs
        first among the block's forward hooks)."""
        for (li, name) in sorted(tables):
            mlp = parts.layers[li].mlp
            if name == "mlp.down_proj.in" and hasattr(mlp, "down_proj"):
                mod, kind, full = mlp.down_proj, "input", f"model.layers.{li}.mlp.down_proj"
            elif name == "mlp.out" and not hasattr(mlp, "down_proj"):
                mod, kind, full = mlp, "output", f"model.layers.{li}.mlp"
            else:
                continue
            what = foreign_hooks(mod, kind)
            if what is not None:
                raise AttachError(
                    f"{full} has {what} installed by another library, and the 'triton' backend applies the "
                    f"{name} map of layer {li} on the other side of that hook from where the reference applies it: "
                    f"attach with backend='torch' or 'reference', or remove the hook first")

    def install(self, ctx) -> None:
        parts, patcher = ctx.parts, ctx.patcher
        if not ctx.tables:  # nothing to steer: leave the model untouched (bit-exact)
            return
        fam = parts.family
        self._refuse_bypassed(parts)
        self.refuse_reordered(parts, ctx.tables)
        observe_conventions(parts)  # tuple or tensor: the fused forward returns what the HF layer returns
        gemma = fam.rms == "gemma"
        router = ctx.router
        stash = _Stash()
        slots = _SlotCache(router)
        by_layer = tables_by_layer(ctx)
        layers = parts.layers

        for li, layer in enumerate(layers):
            maps = by_layer.get(li, {})
            t_attn = maps.get("attn.o_proj.in")
            if t_attn is not None:
                def o_op(x, t):
                    A, B, sl = slots.args(t, x.numel() // x.shape[-1], x.device)
                    return x if A is None else on_local(x, lambda x: affine_map(x, A, B, sl))
                patch_o_proj(ctx, li, layer, t_attn, o_op)
            if li + 1 < len(layers):
                next_norm = getattr(layers[li + 1], fam.pre_attn_norm) if fam.pre_attn_norm else None
            else:
                next_norm = parts.final_norm
            patcher.set_forward(layer, self._layer_forward(ctx, li, layer, maps, next_norm, stash, slots,
                                                           gemma))

        final = parts.final_norm
        orig_final = patcher.original_forward(final)

        def final_forward(x, *a, **k):
            n = stash.take(x, final, final)
            return n if n is not None else orig_final(x, *a, **k)
        patcher.set_forward(final, final_forward)

        base = parts.base
        orig_base = patcher.original_forward(base)

        def stack_forward(*args, **kwargs):
            ctx.begin_forward()
            stash.clear()
            try:
                out = orig_base(*args, **kwargs)
            except BaseException:
                stash.clear()
                ctx.end_forward(failed=True)
                raise
            stash.clear()
            ctx.end_forward()
            return out
        patcher.set_forward(base, stack_forward)

    @staticmethod
    def _skipped(parts, li: int) -> list:
        """(name, module) of the modules of layer ``li`` whose work the fused layer does without calling them:
        its norms but the pre-attention one (called, or its carried result used), and a dense MLP (a sparse MoE
        block and its input norm are called as modules)."""
        fam, layer = parts.family, parts.layers[li]
        names = [n for n in (fam.pre_ffn_norm, fam.post_attn_norm, fam.post_ffn_norm) if n]
        if hasattr(layer.mlp, "down_proj"):
            names.insert(0, "mlp")
        elif fam.pre_ffn_norm:  # sparse MoE layer: its router input norm is called as the HF module
            names.remove(fam.pre_ffn_norm)
        return [(f"model.layers.{li}.{n}", getattr(layer, n)) for n in names]

    def _refuse_bypassed(self, parts, only_layer: int | None = None) -> None:
        """AttachError if a layer (at attach), or a module of one that the fused layer never calls, carries
        another library's forward wrapper or hooks; ``only_layer``: the skipped modules of that layer only."""
        for li, layer in enumerate(parts.layers):
            if only_layer is not None and li != only_layer:
                continue
            mods = [] if only_layer is not None else [(f"model.layers.{li}", layer, False)]
            for name, mod, skipped in mods + [(n, m, True) for n, m in self._skipped(parts, li)]:
                what = foreign_forward(mod, skipped=skipped)
                if what is not None:
                    raise AttachError(
                        f"{name} has {what} installed by another library, which the 'triton' backend would "
                        f"bypass (it fuses {'that layer' if not skipped else 'that module'} into its own kernels): "
                        f"attach with backend='torch', which wraps what is installed, or 'reference' (hooks), or "
                        f"remove it first")

    def _layer_forward(self, ctx, li, layer, maps, next_norm, stash, slots, gemma):
        try:
            ops = TritonOps(ctx, li, layer, layer_modules(ctx.parts.family, layer), maps, next_norm, stash,
                            slots, gemma)
        except ValueError as e:
            raise AttachError(f"backend 'triton': {e}") from None
        ops.backend, ops.parts, ops.li = self, ctx.parts, li
        ops.skipped = [m for _n, m in self._skipped(ctx.parts, li)]
        return routed_forward(ctx, layer, layer_forward(ops, as_tuple=bool(layer_returns_tuple(type(layer)))))


class TritonOps:
    """The Triton ops of the layer skeleton: every residual add fuses with the norms around it (the block
    output's post-norm before it, the next norm after it) and the map at its site; the GLU fuses with the
    mlp.down_proj.in map; the block's last add also computes the *next* layer's input norm, carried to it
    through the stash. Per family (the adapter's layout): pre-norm layers fuse add + next norm, sandwich layers
    post-norm + add + next norm, post-norm layers (OLMo-2) post-norm + add; Granite's residual multiplier is one
    elementwise multiply before the fused add; a sparse MoE block is called as the HF module."""

    def __init__(self, ctx, li, layer, modules, maps, next_norm, stash, slots, gemma):
        m = self.modules = modules
        self.layer, self.stash, self.slots, self.gemma = layer, stash, slots, gemma
        self.act = m.act_kind
        if not m.sparse and self.act is None:
            raise AttachError(f"layer {li}: the MLP activation {type(m.act).__name__} is neither SiLU nor GELU-tanh, "
                              f"which the fused GLU kernel computes; attach with backend='torch'")
        eps = [_norm_eps(n) for n in m.norms() + ([next_norm] if next_norm is not None else [])]
        self.eps = eps[0] if eps else 1e-6
        if any(abs(e - self.eps) > 0 for e in eps):
            raise ValueError(f"layer {li}: RMSNorm eps differ between norms; the fused kernel uses one eps")
        self.t_down, self.t_mout, self.t_out = (maps.get(s) for s in ("mlp.down_proj.in", "mlp.out", "layer.out"))
        self.c_down, self.c_mout, self.c_out = (ctx.checker(li, s)
                                                for s in ("mlp.down_proj.in", "mlp.out", "layer.out"))
        self.w_ffn = m.ffn_norm.weight if m.ffn_norm is not None else None
        self.w_next = next_norm.weight if next_norm is not None else None
        self.w_post_attn = m.post_attn.weight if m.post_attn is not None else None
        self.w_post_ffn = m.post_ffn.weight if m.post_ffn is not None else None
        self.mult = m.multiplier

    def attn_input(self, x):
        if not torch.compiler.is_compiling() and any(
                m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in self.skipped):
            self.backend._refuse_bypassed(self.parts, only_layer=self.li)  # a wrapper added after attach
        norm = self.modules.in_norm
        if norm is None:  # post-norm layout: attention reads the residual stream itself
            return x
        normed = self.stash.take(x, self.layer, norm)
        return normed if normed is not None else norm(x)

    def _delta(self, h):
        return h if self.mult is None else h * self.mult

    def mid(self, x, h):  # (post-attn norm) + add + pre-FFN norm, one pass
        if self.modules.sparse:
            # a sparse MoE block routes on its input: an ulp of difference from HF's norm can flip an expert,
            # so the router sees exactly HF's RMSNorm of the (fused, exactly rounded) residual add
            s, _ = add_map_rmsnorm(x, self._delta(h), None, self.eps, gemma=self.gemma,
                                   delta_norm_w=self.w_post_attn)
            return s, self.modules.ffn_norm(s)
        s, n2 = add_map_rmsnorm(x, self._delta(h), self.w_ffn, self.eps, gemma=self.gemma,
                                delta_norm_w=self.w_post_attn)
        return s, (s if n2 is None else n2)

    def mlp(self, n2):
        m = self.modules
        rows = n2.numel() // n2.shape[-1]
        if m.sparse:
            d = m.mlp(n2)
        else:
            A, B, sl = self.slots.args(self.t_down, rows, n2.device)
            if m.gate_up is not None:
                gate, up = m.gate_up(n2).chunk(2, dim=-1)
            else:
                gate, up = m.gate(n2), m.up(n2)
            g = glu_map(gate, up, A, B, sl, self.act)
            if A is not None:
                g = self.c_down(g)
            d = m.down(g)
        A, B, sl = self.slots.args(self.t_mout, rows, n2.device)
        if A is not None:
            d = self.c_mout(affine_map(d, A, B, sl))
        return d

    def end(self, s_mid, d):  # (post-FFN norm) + add + layer.out map + next norm, one pass
        rows = s_mid.numel() // s_mid.shape[-1]
        A, B, sl = self.slots.args(self.t_out, rows, s_mid.device)
        s, n_next = add_map_rmsnorm(s_mid, self._delta(d), self.w_next, self.eps, A, B, sl, gemma=self.gemma,
                                    delta_norm_w=self.w_post_ffn)
        if A is not None:
            s = self.c_out(s)
        if n_next is not None:
            self.stash.put(s, n_next, self.layer)
        return s
