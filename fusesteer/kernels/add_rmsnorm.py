"""Fused residual add + ``layer.out`` map + next RMSNorm (fusion point 1 of the design).

Llama / Qwen (``gemma=False``)::

    s      = residual + delta
    s      = a_tab[slot] ⊙ s + b_tab[slot]           (if a map is given)
    normed = s · rsqrt(mean(s²) + eps) · w

Gemma 2/3 (``gemma=True``): the weights act as ``(1 + w)``, and when ``delta_norm_w`` is given the
block output is first post-normed (Gemma's ``post_attention_layernorm`` /
``post_feedforward_layernorm``): ``d = rmsnorm(delta) · (1 + delta_norm_w)``, ``s = residual + d``.
(``delta_norm_w`` with ``gemma=False`` uses the plain ``w`` convention.)

All math in float32; ``s`` and ``normed`` are stored in the input dtype. ``norm_w=None`` skips the
norm and returns ``(s, None)`` (last layer when the final norm is not fused).

One file, three parts: the Triton kernel, the host wrappers (custom ops
``fusesteer::add_map_rmsnorm`` returning ``(s, normed)`` and ``fusesteer::add_map`` returning
``s``), and the torch reference.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..formula import affine
from . import _common as C

if C.HAVE_TRITON:
    import triton.language as tl

    from ._device import apply_map, store_row

    @C.jit
    def _add_rmsnorm_kernel(
        r_ptr, d_ptr, s_ptr, n_ptr, w_ptr, dw_ptr, a_ptr, b_ptr, slot_ptr,
        W, S, eps,
        BLOCK: tl.constexpr,
        HAS_MAP: tl.constexpr,
        HAS_NORM: tl.constexpr,
        HAS_DNORM: tl.constexpr,
        GEMMA: tl.constexpr,
        OUT_BF16: tl.constexpr,
    ):
        # grid = (M,): one program holds one whole row (needed for the row reductions).
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        cmask = cols < W
        r = tl.load(r_ptr + row * W + cols, mask=cmask, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + row * W + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_DNORM:
            dw = tl.load(dw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            if GEMMA:
                dw = dw + 1.0
            d_rstd = tl.rsqrt(tl.sum(d * d, axis=0) / W + eps)
            d = d * d_rstd * dw
        s = r + d
        if HAS_MAP:
            s = apply_map(s, a_ptr, b_ptr, slot_ptr, row, cols, cmask, W, S)
        store_row(s_ptr, row * W, cols, s, cmask, OUT_BF16)
        if HAS_NORM:
            # masked lanes of s are exactly 0 (r = d = 0, a = 1, b = 0) and do not bias the mean
            w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            if GEMMA:
                w = w + 1.0
            rstd = tl.rsqrt(tl.sum(s * s, axis=0) / W + eps)
            n = s * rstd * w
            store_row(n_ptr, row * W, cols, n, cmask, OUT_BF16)


OP = "add_map_rmsnorm"


def _rmsnorm_f32(x: torch.Tensor, w: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    w32 = w.float() + 1.0 if gemma else w.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w32


def add_map_rmsnorm_reference(
    residual: torch.Tensor,
    delta: torch.Tensor,
    norm_w: Optional[torch.Tensor],
    eps: float,
    a_tab: Optional[torch.Tensor] = None,
    b_tab: Optional[torch.Tensor] = None,
    slot: Optional[torch.Tensor] = None,
    gemma: bool = False,
    delta_norm_w: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Torch oracle of :func:`add_map_rmsnorm` in float32 math; no input checks."""
    W = residual.shape[-1]
    r = residual.reshape(-1, W).float()
    d = delta.reshape(-1, W).float()
    if delta_norm_w is not None:
        d = _rmsnorm_f32(d, delta_norm_w, eps, gemma)
    s = r + d
    if a_tab is not None:
        a, b = C.map_rows(a_tab, b_tab, slot)
        s = affine(s, a, b)
    normed = None
    if norm_w is not None:
        normed = _rmsnorm_f32(s, norm_w, eps, gemma).to(residual.dtype).reshape(residual.shape)
    return s.to(residual.dtype).reshape(residual.shape), normed


def add_rmsnorm_launch(r2, d2, s, n, norm_w, eps, a_tab, b_tab, slot, gemma,
                       delta_norm_w) -> C.Launch:
    """The launch of :func:`_add_rmsnorm_kernel` for contiguous [M, W] ``r2``/``d2`` and the
    outputs ``s`` and ``n`` (None without a norm): one program per row holding the whole row
    (BLOCK = next power of two of W), :func:`fusesteer.kernels._common.row_num_warps` warps."""
    M, W = r2.shape
    block = C.next_pow2(W)
    has_norm = norm_w is not None
    has_map = a_tab is not None
    if has_map:
        a, b, S = a_tab.contiguous(), b_tab.contiguous(), a_tab.shape[0]
        sl = slot.reshape(-1).contiguous()
    else:  # unused pointers (dead code under the constexpr flags)
        a, b, sl, S = r2, r2, r2, 1
    s_arg = C.store_arg(s)
    return C.Launch(
        _add_rmsnorm_kernel, (M,),
        (r2, d2, s_arg,
         C.store_arg(n) if has_norm else s_arg,
         norm_w.contiguous() if has_norm else r2,
         delta_norm_w.contiguous() if delta_norm_w is not None else r2,
         a, b, sl,
         W, S, float(eps)),
        dict(BLOCK=block, HAS_MAP=has_map, HAS_NORM=has_norm, HAS_DNORM=delta_norm_w is not None,
             GEMMA=bool(gemma), OUT_BF16=s_arg.dtype == torch.int16),
        num_warps=C.row_num_warps(block, r2.element_size()),
    )


def _add_rmsnorm_triton(r2, d2, norm_w, eps, a_tab, b_tab, slot, gemma, delta_norm_w):
    M, W = r2.shape
    s = torch.empty_like(r2)
    n = torch.empty_like(r2) if norm_w is not None else None
    if M == 0:
        return s, n
    if W > C.MAX_ROW_WIDTH:
        raise C.KernelInputError(
            f"{OP}: rows of width {W} exceed the one-program-per-row limit {C.MAX_ROW_WIDTH}"
        )
    add_rmsnorm_launch(r2, d2, s, n, norm_w, eps, a_tab, b_tab, slot, gemma, delta_norm_w).run()
    return s, n


def _check(op, residual, delta, norm_w, eps, a_tab, b_tab, slot, delta_norm_w) -> bool:
    W = C.check_activation(op, "residual", residual)
    C.check_same(op, "delta", delta, "residual", residual)
    if norm_w is not None:
        C.check_vector(op, "norm_w", norm_w, W, residual.device)
    if delta_norm_w is not None:
        C.check_vector(op, "delta_norm_w", delta_norm_w, W, residual.device)
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise C.KernelInputError(f"{op}: eps must be a finite float >= 0, got {eps!r}")
    return C.check_map(
        op, a_tab, b_tab, slot, C.rows_of(residual), W, residual.device, optional=True
    )


def _run(op, residual, delta, norm_w, eps, a_tab, b_tab, slot, gemma, delta_norm_w):
    has_map = _check(op, residual, delta, norm_w, eps, a_tab, b_tab, slot, delta_norm_w)
    if has_map:
        C.check_slot_range(op, slot, a_tab.shape[0])
    if not C.use_triton(residual.device):
        return add_map_rmsnorm_reference(
            residual, delta, norm_w, eps, a_tab, b_tab, slot, gemma, delta_norm_w
        )
    W = residual.shape[-1]
    s, n = _add_rmsnorm_triton(
        residual.reshape(-1, W).contiguous(), delta.reshape(-1, W).contiguous(),
        norm_w, eps, a_tab, b_tab, slot, gemma, delta_norm_w,
    )
    return s.reshape(residual.shape), (n.reshape(residual.shape) if n is not None else None)


@torch.library.custom_op("fusesteer::add_map_rmsnorm", mutates_args=())
def _add_map_rmsnorm_op(
    residual: torch.Tensor,
    delta: torch.Tensor,
    norm_w: torch.Tensor,
    eps: float,
    a_tab: Optional[torch.Tensor],
    b_tab: Optional[torch.Tensor],
    slot: Optional[torch.Tensor],
    gemma: bool,
    delta_norm_w: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(OP, residual, delta, norm_w, eps, a_tab, b_tab, slot, gemma, delta_norm_w)


@_add_map_rmsnorm_op.register_fake
def _add_map_rmsnorm_fake(residual, delta, norm_w, eps, a_tab, b_tab, slot, gemma, delta_norm_w):
    _check(OP, residual, delta, norm_w, eps, a_tab, b_tab, slot, delta_norm_w)
    return residual.new_empty(residual.shape), residual.new_empty(residual.shape)


@torch.library.custom_op("fusesteer::add_map", mutates_args=())
def _add_map_op(
    residual: torch.Tensor,
    delta: torch.Tensor,
    eps: float,
    a_tab: Optional[torch.Tensor],
    b_tab: Optional[torch.Tensor],
    slot: Optional[torch.Tensor],
    gemma: bool,
    delta_norm_w: Optional[torch.Tensor],
) -> torch.Tensor:
    return _run("add_map", residual, delta, None, eps, a_tab, b_tab, slot, gemma, delta_norm_w)[0]


@_add_map_op.register_fake
def _add_map_fake(residual, delta, eps, a_tab, b_tab, slot, gemma, delta_norm_w):
    _check("add_map", residual, delta, None, eps, a_tab, b_tab, slot, delta_norm_w)
    return residual.new_empty(residual.shape)


def add_map_rmsnorm(
    residual: torch.Tensor,
    delta: torch.Tensor,
    norm_w: Optional[torch.Tensor],
    eps: float,
    a_tab: Optional[torch.Tensor] = None,
    b_tab: Optional[torch.Tensor] = None,
    slot: Optional[torch.Tensor] = None,
    gemma: bool = False,
    delta_norm_w: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Fused ``s = residual + delta`` (+ Gemma post-norm of delta) + map + RMSNorm; see module doc.

    residual, delta: [..., W] same shape and dtype; norm_w, delta_norm_w: [W] (any float dtype,
    upcast to fp32) or None; a_tab, b_tab: float32 [S, W] and slot: int [M], or all None for no
    map. Returns ``(s, normed)`` in residual's dtype, ``normed`` None when ``norm_w`` is None.
    Inference only (no backward).
    """
    C.require_tensors(
        OP, residual=residual, delta=delta, norm_w=norm_w, a_tab=a_tab, b_tab=b_tab, slot=slot,
        delta_norm_w=delta_norm_w,
    )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise C.KernelInputError(f"{OP}: eps must be a float, got {type(eps).__name__}")
    eps = float(eps)
    if not isinstance(gemma, bool):
        raise C.KernelInputError(f"{OP}: gemma must be a bool, got {type(gemma).__name__}")
    if norm_w is None:
        s = torch.ops.fusesteer.add_map(
            residual, delta, eps, a_tab, b_tab, slot, gemma, delta_norm_w
        )
        return s, None
    return torch.ops.fusesteer.add_map_rmsnorm(
        residual, delta, norm_w, eps, a_tab, b_tab, slot, gemma, delta_norm_w
    )
