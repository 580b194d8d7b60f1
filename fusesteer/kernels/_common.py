"""Shared plumbing for the fused steering kernels: dispatch, lazy Triton builds, input checks.

Dispatch (per call, decided from the first input tensor's device and the kernel mode):

* mode ``"auto"`` (default): Triton on CUDA tensors when Triton is importable; on CPU tensors
  Triton only when the Triton interpreter is on (``TRITON_INTERPRET=1``), else the torch
  reference of the op.
* mode ``"triton"``: always the Triton kernel; raises :class:`KernelUnavailableError` when it
  cannot run (Triton missing, or CPU tensors without the interpreter). Tests use this to make
  sure the kernel, not the fallback, is what they check.
* mode ``"torch"``: always the torch reference.

The initial mode comes from the environment variable ``FUSESTEER_KERNELS`` (auto|triton|torch).

How ``TRITON_INTERPRET`` is read (triton 3.x): ``@triton.jit`` decides *at decoration time*
whether to build an ``InterpretedFunction`` or a compiled ``JITFunction``, and Triton's own library
functions (``tl.sum`` ...) are decorated when Triton is imported. The kernels here and their shared device
functions (:mod:`fusesteer.kernels._device`) are decorated when this package is imported
(:func:`jit`), so the variable must be set before that (the test suite sets it in
``tests/conftest.py``). :func:`interpreter_enabled` is true only when the kernels were built for the
interpreter and the variable is still on; a setting changed after the import is reported, never run
half-way (see :func:`use_triton`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch

try:  # Triton is optional (CPU-only installs, macOS).
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None  # type: ignore[assignment]
    HAVE_TRITON = False


from ..errors import KernelInputError, KernelUnavailableError  # noqa: E402,F401 - re-exported

MODES = ("auto", "triton", "torch")
# Elementwise kernels tile the row in blocks of at most this many columns (2-D launch grid).
MAX_ELEMENTWISE_BLOCK = 1024
# Row-reduction kernels hold a whole row in one program.
MAX_ROW_WIDTH = 65536
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SLOT_DTYPES = (torch.int32, torch.int64)


def _initial_mode() -> str:
    mode = os.environ.get("FUSESTEER_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise KernelInputError(f"FUSESTEER_KERNELS={mode!r}: expected one of {MODES}")
    return mode


_MODE = _initial_mode()


def get_kernel_mode() -> str:
    """The current kernel mode: ``"auto"``, ``"triton"`` or ``"torch"``."""
    return _MODE


def set_kernel_mode(mode: str) -> str:
    """Set the kernel mode (see module docstring); returns the previous mode."""
    global _MODE
    if mode not in MODES:
        raise KernelInputError(f"kernel mode {mode!r}: expected one of {MODES}")
    prev, _MODE = _MODE, mode
    return prev


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[None]:
    """Context manager: run the enclosed calls under ``mode`` (e.g. ``"triton"`` in tests)."""
    prev = set_kernel_mode(mode)
    try:
        yield
    finally:
        set_kernel_mode(prev)


#: Was Triton's interpreter on when the kernels were decorated (at this module's import)?
INTERPRETED = HAVE_TRITON and bool(triton.knobs.runtime.interpret)


def jit(fn):
    """``triton.jit`` for the kernels and device functions of this package, applied at import. Every one is
    built under the interpreter setting recorded in :data:`INTERPRETED`: a kernel and the helpers it calls
    must be the same kind, so a setting that changed while the kernel modules were imported is an error."""
    if bool(triton.knobs.runtime.interpret) != INTERPRETED:
        raise KernelUnavailableError(
            f"TRITON_INTERPRET changed while fusesteer.kernels was being imported ({fn.__name__}): set it "
            "before importing fusesteer (or triton)"
        )
    return triton.jit(fn)


def interpreter_enabled() -> bool:
    """True when the kernels run under Triton's interpreter: they were built for it at import and
    ``TRITON_INTERPRET`` is still on."""
    if not HAVE_TRITON:
        return False
    return INTERPRETED and bool(triton.knobs.runtime.interpret)


def _late_interpreter() -> bool:
    """``TRITON_INTERPRET=1`` now, but the kernels were compiled for the GPU at import."""
    return HAVE_TRITON and not INTERPRETED and bool(triton.knobs.runtime.interpret)


def triton_available(device: Optional[torch.device | str] = None) -> bool:
    """Can the Triton kernels run on ``device`` (default: on any device of this machine)?

    CUDA (incl. ROCm) devices need Triton and a visible GPU; CPU needs the Triton interpreter.
    """
    if not HAVE_TRITON:
        return False
    if interpreter_enabled():
        return True
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def use_triton(device: torch.device) -> bool:
    """Decide the path for one call on tensors living on ``device``."""
    if _MODE == "torch":
        return False
    if _MODE == "auto":
        if device.type == "cuda":
            return HAVE_TRITON
        return device.type == "cpu" and interpreter_enabled()
    # forced triton
    if not HAVE_TRITON:
        raise KernelUnavailableError("kernel mode 'triton' but Triton is not installed")
    if device.type == "cuda" or interpreter_enabled():
        return True
    if _late_interpreter():
        raise KernelUnavailableError(
            f"kernel mode 'triton' on {device.type} tensors: TRITON_INTERPRET=1 was set after "
            "fusesteer.kernels was imported, so the kernels were built for the GPU compiler; set "
            "TRITON_INTERPRET=1 before importing fusesteer (or triton)"
        )
    raise KernelUnavailableError(
        f"kernel mode 'triton' on {device.type} tensors needs the Triton interpreter: "
        "set TRITON_INTERPRET=1 (or use mode 'auto' / 'torch')"
    )


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


class Launch:
    """One kernel launch exactly as a host wrapper issues it: the kernel (decorated with :func:`jit`),
    the grid, the positional arguments, the constexpr meta-parameters and ``num_warps``.

    Each kernel file has one ``*_launch`` function that turns the wrapper's tensors into a
    ``Launch``; the wrapper runs it and the ahead-of-time compile check (``python -m bench.aot``)
    builds the same ``Launch`` from meta tensors and compiles it for sm_80/90/100, so the checked
    binaries are the ones the runtime launches (same BLOCK sizes, constexprs, num_warps, dtypes).
    """

    __slots__ = ("fn", "grid", "args", "constexprs", "num_warps")

    def __init__(self, fn, grid: tuple, args: tuple, constexprs: dict,
                 num_warps: int):
        self.fn, self.grid, self.args = fn, grid, args
        self.constexprs, self.num_warps = constexprs, num_warps

    def run(self) -> None:
        self.fn[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)


def row_num_warps(block: int, elem_bytes: int = 2) -> int:
    """Warps for one-row-per-program reductions (ignored by the interpreter): 4 up to 1024
    columns, 8 up to 4096, 16 up to 16384, else 32; float32 rows get at least one warp per 256
    columns (8 elements = two 128-bit vectors per thread): with 16 elements per thread ptxas
    spilled on sm_80 at 4096 columns (``python -m bench.aot``)."""
    if block <= 1024:
        w = 4
    elif block <= 4096:
        w = 8
    elif block <= 16384:
        w = 16
    else:
        w = 32
    if elem_bytes >= 4:
        w = max(w, block // 256)
    return min(32, w)


# --------------------------------------------------------------------------------------------
# Input checks (shared by the real and the fake/meta implementations: shapes and dtypes only)
# --------------------------------------------------------------------------------------------
def check_activation(op: str, name: str, x: torch.Tensor) -> int:
    """``x`` must be a float tensor [..., W] with W >= 1; returns W."""
    if not isinstance(x, torch.Tensor):
        raise KernelInputError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise KernelInputError(f"{op}: {name} must have shape [..., W], got a 0-d tensor")
    if x.dtype not in FLOAT_DTYPES:
        raise KernelInputError(
            f"{op}: {name} has dtype {x.dtype}; supported: float32, float16, bfloat16"
        )
    if x.shape[-1] < 1:
        raise KernelInputError(f"{op}: {name} has an empty last dimension (W = 0)")
    return x.shape[-1]


def check_same(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise KernelInputError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != ref.shape:
        raise KernelInputError(
            f"{op}: {name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}"
        )
    if t.dtype != ref.dtype:
        raise KernelInputError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
    if t.device != ref.device:
        raise KernelInputError(
            f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}"
        )


def check_vector(op: str, name: str, w: torch.Tensor, width: int, device: torch.device) -> None:
    """A per-channel weight: shape [W], float dtype, same device."""
    if not isinstance(w, torch.Tensor):
        raise KernelInputError(f"{op}: {name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 1 or w.shape[0] != width:
        raise KernelInputError(f"{op}: {name} must have shape [{width}], got {tuple(w.shape)}")
    if w.dtype not in FLOAT_DTYPES:
        raise KernelInputError(f"{op}: {name} has dtype {w.dtype}; expected a float dtype")
    if w.device != device:
        raise KernelInputError(f"{op}: {name} is on {w.device} but the activations on {device}")


def check_map(
    op: str,
    a_tab: Optional[torch.Tensor],
    b_tab: Optional[torch.Tensor],
    slot: Optional[torch.Tensor],
    rows: int,
    width: int,
    device: torch.device,
    optional: bool,
) -> bool:
    """Check a plan table pair + slot vector; returns True when a map is given."""
    given = [t is not None for t in (a_tab, b_tab, slot)]
    if not any(given):
        if optional:
            return False
        raise KernelInputError(f"{op}: a_tab, b_tab and slot are required")
    if not all(given):
        raise KernelInputError(
            f"{op}: a_tab, b_tab and slot must be given together (got a_tab="
            f"{'set' if given[0] else 'None'}, b_tab={'set' if given[1] else 'None'}, "
            f"slot={'set' if given[2] else 'None'})"
        )
    for name, t in (("a_tab", a_tab), ("b_tab", b_tab)):
        if not isinstance(t, torch.Tensor):
            raise KernelInputError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.shape[1] != width or t.shape[0] < 1:
            raise KernelInputError(
                f"{op}: {name} must have shape [S, {width}] with S >= 1, got {tuple(t.shape)}"
            )
        if t.dtype != torch.float32:
            raise KernelInputError(f"{op}: {name} must be float32, got {t.dtype}")
        if t.device != device:
            raise KernelInputError(f"{op}: {name} is on {t.device} but the activations on {device}")
    if a_tab.shape != b_tab.shape:
        raise KernelInputError(
            f"{op}: a_tab {tuple(a_tab.shape)} and b_tab {tuple(b_tab.shape)} differ in shape"
        )
    if not isinstance(slot, torch.Tensor):
        raise KernelInputError(f"{op}: slot must be a torch.Tensor, got {type(slot).__name__}")
    if slot.dtype not in SLOT_DTYPES:
        raise KernelInputError(f"{op}: slot must be int32 or int64, got {slot.dtype}")
    if slot.numel() != rows:
        raise KernelInputError(
            f"{op}: slot has {slot.numel()} entries but the input has {rows} rows "
            "(one slot per row of the flattened [M, W] input)"
        )
    if slot.device != device:
        raise KernelInputError(f"{op}: slot is on {slot.device} but the activations on {device}")
    return True


def check_slot_range(op: str, slot: torch.Tensor, num_slots: int) -> None:
    """Slot values must lie in [0, S). Checked on CPU only (on GPU it would cost a device sync;
    there the kernels write NaN for rows with an out-of-range slot instead of reading outside
    the table)."""
    if slot.device.type != "cpu" or slot.numel() == 0:
        return
    lo, hi = int(slot.min()), int(slot.max())
    if lo < 0 or hi >= num_slots:
        raise KernelInputError(
            f"{op}: slot values must lie in [0, {num_slots}) for a table of {num_slots} rows, "
            f"got min {lo}, max {hi}"
        )


def rows_of(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def map_rows(a_tab: torch.Tensor, b_tab: torch.Tensor, slot: torch.Tensor):
    """Per-row (a, b) for the torch references: [M, W] (or [1, W] broadcast when S == 1)."""
    if a_tab.shape[0] == 1:
        return a_tab, b_tab
    idx = slot.reshape(-1).long()
    return a_tab[idx], b_tab[idx]


def store_arg(out: torch.Tensor) -> torch.Tensor:
    """The pointer argument for an output tensor; the kernels' ``OUT_BF16`` is
    ``store_arg(out).dtype == torch.int16``.

    Under the Triton interpreter, bfloat16 outputs are written as int16 bit patterns that the
    kernels round from float32 to nearest-even themselves (``OUT_BF16``): the interpreter's own
    fp32 -> bf16 cast truncates, which would make interpreter results differ from both torch and
    the GPU. Compiled for a GPU the kernels store with ``.to(tl.bfloat16)`` (``cvt.rn.bf16.f32``:
    round-to-nearest-even, the same bits; NaN stays NaN): ``python -m bench.aot`` compiled both,
    and the bit-level rounding cost 38-192 extra SASS instructions per thread (+14-55%) and up to
    6 registers, for nothing, on sm_80/90/100.
    """
    if out.dtype == torch.bfloat16 and INTERPRETED:
        return out.view(torch.int16)
    return out


def require_tensors(op: str, **named) -> None:
    """Cheap pre-dispatch check in the public wrappers (the dispatcher's own type error for a
    non-tensor argument would be a bare RuntimeError); ``None`` is allowed where the schema has
    an optional tensor and is caught by the full checks otherwise."""
    for name, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise KernelInputError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
