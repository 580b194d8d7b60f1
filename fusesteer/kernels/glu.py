"""Fused GLU activation with the ``mlp.down_proj.in`` map:
``y = a_tab[slot] ⊙ (act(gate) · up) + b_tab[slot]``, act ∈ {silu, gelu_tanh}.

One file, three parts: the Triton kernel, the host wrapper (custom op ``fusesteer::glu_map``),
and the torch reference. With ``a_tab = b_tab = slot = None`` it is a plain fused GLU.

All math in float32 (``act(gate)·up`` is not rounded to the storage dtype before the map), the
result is stored in the dtype of ``gate``. SiLU is computed as ``g / (1 + exp(-g))`` and the tanh
GELU as ``g / (1 + exp(-2z))`` with ``z = sqrt(2/pi)·(g + 0.044715·g³)``, which equals
``0.5·g·(1 + tanh(z))`` exactly in real arithmetic and avoids a tanh intrinsic; the reference uses
``torch.nn.functional.silu`` / ``gelu(approximate="tanh")`` (what HF uses).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..formula import affine
from . import _common as C

ACTS = ("silu", "gelu_tanh")

if C.HAVE_TRITON:
    import triton.language as tl

    from ._device import apply_map, store_row

    @C.jit
    def _glu_kernel(
        g_ptr, u_ptr, y_ptr, a_ptr, b_ptr, slot_ptr,
        W, S,
        BLOCK_W: tl.constexpr,
        ACT: tl.constexpr,       # 0 = silu, 1 = gelu_tanh
        HAS_MAP: tl.constexpr,
        OUT_BF16: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        cmask = cols < W
        g = tl.load(g_ptr + row * W + cols, mask=cmask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * W + cols, mask=cmask, other=0.0).to(tl.float32)
        if ACT == 0:
            h = g / (1.0 + tl.exp(-g))
        else:
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2/pi) * (...)
            h = g / (1.0 + tl.exp(-2.0 * z))
        y = h * u
        if HAS_MAP:
            y = apply_map(y, a_ptr, b_ptr, slot_ptr, row, cols, cmask, W, S)
        store_row(y_ptr, row * W, cols, y, cmask, OUT_BF16)


OP = "glu_map"


def _act_reference(g: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return torch.nn.functional.silu(g)
    return torch.nn.functional.gelu(g, approximate="tanh")


def glu_map_reference(
    gate: torch.Tensor,
    up: torch.Tensor,
    a_tab: Optional[torch.Tensor] = None,
    b_tab: Optional[torch.Tensor] = None,
    slot: Optional[torch.Tensor] = None,
    act: str = "silu",
) -> torch.Tensor:
    """Torch oracle: :func:`fusesteer.formula.affine` of ``act(gate.float()) * up.float()`` with the
    table rows, then cast to gate's dtype.

    No input checks beyond ``act``."""
    if act not in ACTS:
        raise C.KernelInputError(f"{OP}: act {act!r}; supported: {ACTS}")
    W = gate.shape[-1]
    y = _act_reference(gate.reshape(-1, W).float(), act) * up.reshape(-1, W).float()
    if a_tab is not None:
        a, b = C.map_rows(a_tab, b_tab, slot)
        y = affine(y, a, b)
    return y.to(gate.dtype).reshape(gate.shape)


def glu_launch(g2: torch.Tensor, u2: torch.Tensor, y: torch.Tensor, a_tab, b_tab, slot,
               act: str) -> C.Launch:
    """The launch of :func:`_glu_kernel` for contiguous [M, W] ``g2``/``u2`` and the output ``y``:
    a (row, column block) grid with blocks of at most ``MAX_ELEMENTWISE_BLOCK`` columns, 4 warps."""
    M, W = g2.shape
    block = min(C.next_pow2(W), C.MAX_ELEMENTWISE_BLOCK)
    has_map = a_tab is not None
    if has_map:
        a, b, S = a_tab.contiguous(), b_tab.contiguous(), a_tab.shape[0]
        s = slot.reshape(-1).contiguous()
    else:  # unused pointers (dead code under HAS_MAP=False)
        a, b, s, S = g2, g2, g2, 1
    y_arg = C.store_arg(y)
    return C.Launch(
        _glu_kernel, (M, C.cdiv(W, block)),
        (g2, u2, y_arg, a, b, s, W, S),
        dict(BLOCK_W=block, ACT=ACTS.index(act), HAS_MAP=has_map,
             OUT_BF16=y_arg.dtype == torch.int16),
        num_warps=4,
    )


def _glu_triton(g2, u2, a_tab, b_tab, slot, act: str) -> torch.Tensor:
    y = torch.empty_like(g2)
    if g2.shape[0] == 0:
        return y
    glu_launch(g2, u2, y, a_tab, b_tab, slot, act).run()
    return y


def _check(gate, up, a_tab, b_tab, slot, act) -> bool:
    W = C.check_activation(OP, "gate", gate)
    C.check_same(OP, "up", up, "gate", gate)
    if act not in ACTS:
        raise C.KernelInputError(f"{OP}: act {act!r}; supported: {ACTS}")
    return C.check_map(OP, a_tab, b_tab, slot, C.rows_of(gate), W, gate.device, optional=True)


@torch.library.custom_op("fusesteer::glu_map", mutates_args=())
def _glu_op(
    gate: torch.Tensor,
    up: torch.Tensor,
    a_tab: Optional[torch.Tensor],
    b_tab: Optional[torch.Tensor],
    slot: Optional[torch.Tensor],
    act: str,
) -> torch.Tensor:
    has_map = _check(gate, up, a_tab, b_tab, slot, act)
    if has_map:
        C.check_slot_range(OP, slot, a_tab.shape[0])
    if not C.use_triton(gate.device):
        return glu_map_reference(gate, up, a_tab, b_tab, slot, act)
    W = gate.shape[-1]
    y = _glu_triton(
        gate.reshape(-1, W).contiguous(), up.reshape(-1, W).contiguous(), a_tab, b_tab, slot, act
    )
    return y.reshape(gate.shape)


@_glu_op.register_fake
def _glu_fake(gate, up, a_tab, b_tab, slot, act):
    _check(gate, up, a_tab, b_tab, slot, act)
    return gate.new_empty(gate.shape)


def glu_map(
    gate: torch.Tensor,
    up: torch.Tensor,
    a_tab: Optional[torch.Tensor] = None,
    b_tab: Optional[torch.Tensor] = None,
    slot: Optional[torch.Tensor] = None,
    act: str = "silu",
) -> torch.Tensor:
    """``y = a_tab[slot] ⊙ (act(gate)·up) + b_tab[slot]`` (fp32 math, stored in gate's dtype).

    gate, up: [..., W] same shape/dtype; a_tab, b_tab: float32 [S, W]; slot: int [M]; all three
    None for a plain fused GLU. act: "silu" (Llama/Qwen) or "gelu_tanh" (Gemma).
    Inference only (no backward).
    """
    C.require_tensors(OP, gate=gate, up=up, a_tab=a_tab, b_tab=b_tab, slot=slot)
    if not isinstance(act, str):
        raise C.KernelInputError(f"{OP}: act must be a string, one of {ACTS}")
    return torch.ops.fusesteer.glu_map(gate, up, a_tab, b_tab, slot, act)
