"""Fused steering kernels: one file per op, each holding the Triton kernel, its host wrapper
(a ``torch.library`` custom op in the ``fusesteer`` namespace) and the torch reference.

=====================  ==================================  ==========================================
wrapper                custom op(s)                        site / fusion point
=====================  ==================================  ==========================================
``affine_map``         ``fusesteer::affine_map``           ``attn.o_proj.in``, ``mlp.out``
``glu_map``            ``fusesteer::glu_map``              ``mlp.down_proj.in`` (fused GLU)
``add_map_rmsnorm``    ``fusesteer::add_map_rmsnorm``,     ``layer.out`` fused with the residual add
                       ``fusesteer::add_map``              and the next RMSNorm
=====================  ==================================  ==========================================

Plan tables are float32 ``[S, W]`` tensors (row 0 = identity); ``slot`` gives one table row per
row of the flattened input. Dispatch: Triton on CUDA, Triton on CPU only under
``TRITON_INTERPRET=1``, otherwise the torch reference; see :mod:`fusesteer.kernels._common`
(``kernel_mode("triton")`` forces the kernel, ``kernel_mode("torch")`` the reference).
"""

from ._common import (
    KernelInputError,
    KernelUnavailableError,
    get_kernel_mode,
    interpreter_enabled,
    kernel_mode,
    set_kernel_mode,
    triton_available,
)
from .add_rmsnorm import add_map_rmsnorm, add_map_rmsnorm_reference
from .affine import affine_map, affine_map_reference
from .glu import ACTS, glu_map, glu_map_reference

__all__ = [
    "ACTS",
    "KernelInputError",
    "KernelUnavailableError",
    "add_map_rmsnorm",
    "add_map_rmsnorm_reference",
    "affine_map",
    "affine_map_reference",
    "get_kernel_mode",
    "glu_map",
    "glu_map_reference",
    "interpreter_enabled",
    "kernel_mode",
    "set_kernel_mode",
    "triton_available",
]
