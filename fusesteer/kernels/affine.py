"""Per-row diagonal affine map ``y = a_tab[slot] * x + b_tab[slot]`` (sites ``attn.o_proj.in``,
``mlp.out`` when not folded into weights).

One file, three parts: the Triton kernel, the host wrapper (registered as the custom op
``fusesteer::affine_map``), and the torch reference the kernel is tested against.

Semantics: ``x`` is [..., W] (flattened to [M, W]); ``a_tab, b_tab`` are float32 [S, W] plan
tables (row 0 is the identity by convention); ``slot`` holds one table row index per row of the
flattened input (int32/int64, M entries). The map is computed in float32 and stored in x's dtype.
For a uniform map pass a 1-row table and a zero slot vector.
"""

from __future__ import annotations

import torch

from ..formula import affine
from . import _common as C

if C.HAVE_TRITON:
    import triton.language as tl

    from ._device import apply_map, store_row

    @C.jit
    def _affine_kernel(
        x_ptr, y_ptr, a_ptr, b_ptr, slot_ptr,
        W, S,
        BLOCK_W: tl.constexpr,
        OUT_BF16: tl.constexpr,
    ):
        # grid = (M, cdiv(W, BLOCK_W)): one program per (row, column block).
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        cmask = cols < W
        x = tl.load(x_ptr + row * W + cols, mask=cmask, other=0.0).to(tl.float32)
        y = apply_map(x, a_ptr, b_ptr, slot_ptr, row, cols, cmask, W, S)
        store_row(y_ptr, row * W, cols, y, cmask, OUT_BF16)


OP = "affine_map"


def affine_map_reference(
    x: torch.Tensor, a_tab: torch.Tensor, b_tab: torch.Tensor, slot: torch.Tensor
) -> torch.Tensor:
    """Torch oracle: :func:`fusesteer.formula.affine` of each row with its table row; no input checks."""
    W = x.shape[-1]
    a, b = C.map_rows(a_tab, b_tab, slot)
    return affine(x.reshape(-1, W), a, b).reshape(x.shape)


def affine_launch(x2: torch.Tensor, y: torch.Tensor, a_tab, b_tab, slot) -> C.Launch:
    """The launch of :func:`_affine_kernel` for a contiguous [M, W] input ``x2`` and its output
    ``y``: a (row, column block) grid with blocks of at most ``MAX_ELEMENTWISE_BLOCK`` columns,
    4 warps."""
    M, W = x2.shape
    block = min(C.next_pow2(W), C.MAX_ELEMENTWISE_BLOCK)
    y_arg = C.store_arg(y)
    return C.Launch(
        _affine_kernel, (M, C.cdiv(W, block)),
        (x2, y_arg, a_tab.contiguous(), b_tab.contiguous(), slot.reshape(-1).contiguous(),
         W, a_tab.shape[0]),
        dict(BLOCK_W=block, OUT_BF16=y_arg.dtype == torch.int16), num_warps=4,
    )


def _affine_triton(x2: torch.Tensor, a_tab, b_tab, slot) -> torch.Tensor:
    """Launch the kernel on a contiguous [M, W] input."""
    y = torch.empty_like(x2)
    if x2.shape[0] == 0:
        return y
    affine_launch(x2, y, a_tab, b_tab, slot).run()
    return y


def _check(x, a_tab, b_tab, slot) -> None:
    W = C.check_activation(OP, "x", x)
    C.check_map(OP, a_tab, b_tab, slot, C.rows_of(x), W, x.device, optional=False)


@torch.library.custom_op("fusesteer::affine_map", mutates_args=())
def _affine_op(
    x: torch.Tensor, a_tab: torch.Tensor, b_tab: torch.Tensor, slot: torch.Tensor
) -> torch.Tensor:
    _check(x, a_tab, b_tab, slot)
    C.check_slot_range(OP, slot, a_tab.shape[0])
    if not C.use_triton(x.device):
        return affine_map_reference(x, a_tab, b_tab, slot)
    W = x.shape[-1]
    y = _affine_triton(x.reshape(-1, W).contiguous(), a_tab, b_tab, slot)
    return y.reshape(x.shape)


@_affine_op.register_fake
def _affine_fake(x, a_tab, b_tab, slot):
    _check(x, a_tab, b_tab, slot)
    return x.new_empty(x.shape)


def affine_map(
    x: torch.Tensor, a_tab: torch.Tensor, b_tab: torch.Tensor, slot: torch.Tensor
) -> torch.Tensor:
    """``y = a_tab[slot] ⊙ x + b_tab[slot]`` per row, fp32 math, stored in ``x.dtype``.

    x: [..., W] float32/float16/bfloat16; a_tab, b_tab: float32 [S, W]; slot: int [M] with
    M = x.numel() // W. Returns a new tensor of x's shape. Inference only (no backward).
    """
    C.require_tensors(OP, x=x, a_tab=a_tab, b_tab=b_tab, slot=slot)
    if a_tab is None or b_tab is None or slot is None:
        raise C.KernelInputError(f"{OP}: a_tab, b_tab and slot are required")
    return torch.ops.fusesteer.affine_map(x, a_tab, b_tab, slot)
