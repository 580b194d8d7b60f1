"""Triton device functions shared by the kernels: the steering map of one row and the store of a result.

Both are ``@triton.jit`` functions (decorated at import through :func:`fusesteer.kernels._common.jit`, like
the kernels that call them); Triton inlines them into each kernel (``python -m bench.aot`` checks that the
compiled kernels contain no calls).

* :func:`apply_map` — ``a_tab[slot] ⊙ y + b_tab[slot]`` for the columns ``cols`` of row ``row``, as one fma
  (one rounding, like the torch formula in :mod:`fusesteer.formula`). The slot is one scalar load; the table
  row is then plain pointer arithmetic. An out-of-range slot is clamped for the address (never reads outside
  the table) and the row becomes NaN, so the bug is loud (the host checks the range on CPU:
  ``_common.check_slot_range``).
* :func:`store_row` — the float32 result stored at ``ptr + start + cols`` in the output's dtype. With
  ``OUT_BF16`` (Triton's interpreter only, see ``_common.store_arg``) the output is an int16 view and the
  value is rounded to bfloat16 nearest-even on its bits, because the interpreter's own cast truncates.
"""

from __future__ import annotations

from . import _common as C

if C.HAVE_TRITON:
    import triton.language as tl

    @C.jit
    def apply_map(y, a_ptr, b_ptr, slot_ptr, row, cols, cmask, W, S):
        sl = tl.load(slot_ptr + row).to(tl.int64)
        ok = (sl >= 0) & (sl < S)
        sl = tl.minimum(tl.maximum(sl, 0), S - 1)
        a = tl.load(a_ptr + sl * W + cols, mask=cmask, other=1.0)
        b = tl.load(b_ptr + sl * W + cols, mask=cmask, other=0.0)
        return tl.where(ok, tl.fma(y, a, b), float("nan"))

    @C.jit
    def store_row(ptr, start, cols, y, mask, OUT_BF16: tl.constexpr):
        if OUT_BF16:
            yb = y.to(tl.uint32, bitcast=True)
            yb = yb + 0x7FFF + ((yb >> 16) & 1)
            yo = tl.where(y != y, 0x7FC0, yb >> 16).to(tl.uint16).to(tl.int16, bitcast=True)
        else:
            yo = y.to(ptr.dtype.element_ty)
        tl.store(ptr + start + cols, yo, mask=mask)
