"""Every parity tolerance of fusesteer, in one place: logits against the reference (tests, ``bench parity``),
one decoder layer against the original forward / the reference (the attach-time contract probe), and one kernel
against its torch reference (the kernel tests under Triton's interpreter, ``bench gpu`` on a GPU).

Logits (the fused and folded backends against the ``reference`` hooks, teacher-forced):

* fp32: ``<= 1e-5`` absolute and identical greedy tokens.
* bf16 / fp16: ``<= 0.02 * max|ref logit| + 1e-2`` for the torch path and folded weights; ``<= 0.03 * max|ref
  logit| + 2e-2`` for the Triton kernels, which round once per fused op where HF rounds after every step.
* bitsandbytes 8-bit (fp32 activations): ``<= 1e-4`` absolute and identical greedy tokens; the Triton kernels
  get the bf16 rule there (their fused fp32 norms differ from HF's by an ulp, and 8-bit matmuls quantize their
  *inputs* per row, so an ulp can move a value across an int8 rounding step: measured 7.5e-3 on tiny Gemma-3).

Kernels (one output against its torch reference): fp32 within ``atol + rtol * |ref|`` (1e-6 under the
interpreter, whose fma matches the reference's; 1e-5 on a GPU, whose reductions sum in another tree); fp16 /
bf16 at most 1 ulp of the storage type apart (or within 1e-6 near zero), and at most 1% of the elements 1 ulp
off (a systematic rounding bug puts about half of them off).
"""

from __future__ import annotations

import torch

FP32_ABS = 1e-5
INT8_ABS = 1e-4
HALF_REL = 0.02  # bf16 / fp16, torch path and folded weights
HALF_ABS = 1e-2
HALF_REL_TRITON = 0.03  # bf16 / fp16, Triton kernels
HALF_ABS_TRITON = 2e-2

#: dtypes (as bench labels) whose greedy tokens must all agree with the reference
EXACT_TOKEN_DTYPES = ("fp32", "int8")

#: a comparison is only meaningful if the plan moved the reference logits by more than this
MIN_EFFECT = 1e-3

#: kernels, fp32: (atol, rtol) under Triton's interpreter and on a GPU
KERNEL_FP32_INTERPRETER = (1e-6, 1e-6)
KERNEL_FP32_GPU = (1e-5, 1e-5)
KERNEL_NEAR_ZERO = 1e-6  # half precision: a difference this small passes whatever its ulps
KERNEL_ONE_ULP_FRACTION = 0.01


def logit_tolerance(dtype: str, backend: str, ref_absmax: float) -> float:
    """Largest allowed max |logit - reference logit| for ``backend`` at ``dtype`` ("fp32", "bf16", "fp16",
    "int8"), given the largest reference logit magnitude ``ref_absmax``."""
    if dtype == "fp32":
        return FP32_ABS
    if dtype == "int8":
        if backend == "triton":
            return HALF_REL * ref_absmax + HALF_ABS
        return INT8_ABS
    if dtype in ("bf16", "fp16"):
        if backend == "triton":
            return HALF_REL_TRITON * ref_absmax + HALF_ABS_TRITON
        return HALF_REL * ref_absmax + HALF_ABS
    raise ValueError(f"no parity threshold for dtype {dtype!r}")


def tokens_must_agree(dtype: str) -> bool:
    return dtype in EXACT_TOKEN_DTYPES


def layer_tolerance(backend: str, dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol relative to max |ref|) for one patched decoder layer against the original forward or the
    reference hooks (the contract probe): exact for the torch path in fp32; the kernels sum in another order."""
    if backend != "triton":
        return (0.0, 0.0) if dtype == torch.float32 else (0.0, 1e-2)
    return (1e-5, 1e-5) if dtype == torch.float32 else (1e-3, 2e-2)


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """Float bits as integers ordered like the floats (+0 and -0 both to 0): their difference counts ulps."""
    ity = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype]
    bits = t.contiguous().view(ity).to(torch.int64)
    top = 1 << (8 * t.element_size() - 1)
    return torch.where(bits < 0, -(bits + top), bits)


def kernel_parity(out: torch.Tensor, ref: torch.Tensor, fp32=KERNEL_FP32_INTERPRETER,
                  max_off_frac: float = KERNEL_ONE_ULP_FRACTION) -> dict:
    """One kernel output against its reference, by the rule above: a record with ``ok`` and what it measured."""
    out, ref = out.detach().cpu(), ref.detach().cpu()
    diff = (out.float() - ref.float()).abs()
    rec = {"max_abs": float(diff.max()) if diff.numel() else 0.0,
           "nan": bool(out.isnan().any()) or bool(ref.isnan().any())}
    if out.dtype == torch.float32:
        atol, rtol = fp32
        bad = diff > atol + rtol * ref.float().abs()
        rec.update(bad=int(bad.sum()), ok=not rec["nan"] and not bool(bad.any()))
        return rec
    ulps = (_ordered(out) - _ordered(ref)).abs()
    over = (ulps > 1) & ~(diff <= KERNEL_NEAR_ZERO)
    off = int((ulps == 1).sum())
    allowed = max(4, int(max_off_frac * out.numel()))
    rec.update(max_ulp=int(ulps.max()) if ulps.numel() else 0, over_1ulp=int(over.sum()), one_ulp=off,
               one_ulp_allowed=allowed, ok=not rec["nan"] and not bool(over.any()) and off <= allowed)
    return rec


def describe() -> dict:
    """The logit thresholds as data (written into the bench JSON)."""
    return {
        "fp32": {"max_abs_logit": FP32_ABS, "greedy_tokens": "all equal"},
        "int8": {"max_abs_logit": f"{INT8_ABS} (triton: {HALF_REL} * max|ref| + {HALF_ABS})",
                 "greedy_tokens": "all equal", "note": "bitsandbytes 8-bit weights, fp32 activations"},
        "bf16": {"max_abs_logit": f"{HALF_REL} * max|ref| + {HALF_ABS} (triton: {HALF_REL_TRITON} * max|ref| + "
                                  f"{HALF_ABS_TRITON})", "greedy_tokens": "reported, not gated"},
        "fp16": {"max_abs_logit": "same rule as bf16 (not covered by the tests)",
                 "greedy_tokens": "reported, not gated"},
        "min_effect": MIN_EFFECT,
    }
