"""Tests of the fused steering kernels (fusesteer/kernels/*) against their torch references.

How the Triton kernels run here: there is no GPU, so every Triton kernel in this file runs under
the Triton *interpreter* (``TRITON_INTERPRET=1``, set by ``tests/conftest.py`` before anything imports
Triton). ``@triton.jit`` picks interpreter vs. compiler when it decorates, and fusesteer decorates its
kernels and their shared device functions (``fusesteer/kernels/_device.py``) at import
(``fusesteer.kernels._common.jit``); ``test_kernels_are_built_at_import`` checks that they were built for
the interpreter, ``test_a_late_interpreter_setting_is_reported`` what happens when the variable is set
too late.

Verified only through the interpreter (what could differ on a GPU):
* Arithmetic: the interpreter runs numpy fp32 ops: correctly rounded ``exp``/``rsqrt``, no FMA
  contraction, numpy's summation order. On a GPU ``tl.exp`` / ``tl.rsqrt`` are approximate
  (a few ulp), ``a*x + b`` may be contracted to an FMA, and the row reduction uses a different
  tree, so fp32 results can differ from the torch reference by a few ulp (inside this file's fp32
  tolerance) and fp16/bf16 outputs by 1 ulp where a value sits next to a rounding boundary.
  Identity rows stay bit-exact on a GPU too: ``1*x + 0`` is exact with or without FMA, and the
  identity row of the fused add+norm goes through the same instructions as the no-map path.
* bf16 stores: the interpreter's own fp32->bf16 cast truncates; the kernels round to nearest even
  on the bits themselves, which is bit-identical to torch and to the GPU's ``cvt.rn.bf16.f32``.
* Not exercised: ``num_warps`` / layouts, real parallel execution and coalescing, compile-time
  specialisation of ``W``, rows longer than 2**31 elements (offsets are int64), the CUDA-only
  out-of-range-slot behaviour in a real launch (tested here through the same kernel code).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusesteer.kernels as K
from fusesteer.formula import affine
from fusesteer.kernels import _common as C
from fusesteer.kernels.add_rmsnorm import _add_rmsnorm_triton
from fusesteer.kernels.affine import _affine_triton
from fusesteer.kernels.glu import _glu_triton
from fusesteer.tolerances import KERNEL_ONE_ULP_FRACTION, kernel_parity

needs_triton = pytest.mark.skipif(not C.HAVE_TRITON, reason="triton is not installed")

WIDTHS = (64, 576, 640, 1536, 2304)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROWS = (1, 5)
EPS = 1e-6
SLOTS = {1: [2], 5: [0, 1, 2, 1, 0]}


@pytest.fixture(autouse=True)
def _single_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def acts(m: int, w: int, dtype, seed: int, scale: float = 2.0) -> torch.Tensor:
    return (scale * torch.randn(m, w, generator=gen(seed))).to(dtype)


def tables(w: int, seed: int, s: int = 3):
    """float32 [S, W] tables; row 0 identity, other rows mixed gains (incl. 0 and negative)."""
    g = gen(seed)
    a = 1.0 + (torch.rand(s, w, generator=g) - 0.5)
    b = 0.5 * torch.randn(s, w, generator=g)
    a[0], b[0] = 1.0, 0.0
    if s > 2:
        a[2, ::7] = 0.0
        a[2, 3::11] = -1.5
    return a, b


def slots(m: int) -> torch.Tensor:
    return torch.tensor(SLOTS[m], dtype=torch.int32)


def assert_close(out: torch.Tensor, ref: torch.Tensor, max_off_frac: float = KERNEL_ONE_ULP_FRACTION) -> None:
    """The interpreter rule of :mod:`fusesteer.tolerances` (fp32 within 1e-6; half precision at most 1 ulp apart,
    at most ``max_off_frac`` of the elements 1 ulp off)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    rec = kernel_parity(out, ref, max_off_frac=max_off_frac)
    assert rec["ok"], rec


# ------------------------------------------------------------------------------------------
# the interpreter setting
# ------------------------------------------------------------------------------------------
@needs_triton
def test_kernels_are_built_at_import():
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    from fusesteer.kernels import _device as D
    from fusesteer.kernels.add_rmsnorm import _add_rmsnorm_kernel
    from fusesteer.kernels.affine import _affine_kernel
    from fusesteer.kernels.glu import _glu_kernel

    assert triton.knobs.runtime.interpret, (
        "TRITON_INTERPRET=1 is set but triton.knobs.runtime.interpret is False: some code "
        "assigned the knob programmatically, which overrides the environment variable"
    )
    assert C.INTERPRETED and K.interpreter_enabled() and K.triton_available("cpu") and K.triton_available()
    for k in (_affine_kernel, _glu_kernel, _add_rmsnorm_kernel, D.apply_map, D.store_row):
        assert isinstance(k, InterpretedFunction), k
    # the kernels call the shared device functions, which hold the only copy of the slot clamp and of the
    # bf16 rounding
    src = {p.name: p.read_text() for p in Path(C.__file__).parent.glob("*.py")}
    for name in ("affine.py", "glu.py", "add_rmsnorm.py"):
        assert "apply_map(" in src[name] and "store_row(" in src[name], name
    for fragment in ("tl.minimum(tl.maximum(sl", "0x7FFF"):
        assert [n for n, t in src.items() if fragment in t] == ["_device.py"], fragment


LATE = """
import os, torch
import fusesteer.kernels as K
from fusesteer.kernels import _common as C
from triton.runtime.jit import JITFunction
from fusesteer.kernels.affine import _affine_kernel
assert not C.INTERPRETED and type(_affine_kernel) is JITFunction
os.environ["TRITON_INTERPRET"] = "1"   # too late: the kernels were built for the GPU compiler
x, a, b, s = torch.randn(3, 8), torch.rand(2, 8), torch.randn(2, 8), torch.tensor([0, 1, 1])
assert not K.interpreter_enabled() and not K.triton_available("cpu")
assert torch.equal(K.affine_map(x, a, b, s), K.affine_map_reference(x, a, b, s))  # auto: the torch reference
try:
    with K.kernel_mode("triton"):
        K.affine_map(x, a, b, s)
except K.KernelUnavailableError as e:
    print("ERROR:", e)
"""


@needs_triton
def test_a_late_interpreter_setting_is_reported():
    """Kernels built for the compiler at import (no TRITON_INTERPRET), the variable set afterwards: on CPU
    tensors auto mode takes the torch reference and forced Triton says why it cannot run."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", LATE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ERROR:" in r.stdout and "set after fusesteer.kernels was imported" in r.stdout, r.stdout


# ------------------------------------------------------------------------------------------
# kernels vs references
# ------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("w", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_affine_matches_reference(dtype, w, m):
    x = acts(m, w, dtype, seed=w + m)
    a, b = tables(w, seed=w)
    s = slots(m)
    with K.kernel_mode("triton"):
        y = K.affine_map(x, a, b, s)
    ref = K.affine_map_reference(x, a, b, s)
    assert_close(y, ref)
    # the reference is the one steering formula, and the kernel computes it with the same single rounding
    assert torch.equal(ref, affine(x, a[s.long()], b[s.long()]))
    if dtype == torch.float32:
        assert torch.equal(y, ref)


@needs_triton
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("w", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", K.ACTS)
def test_glu_matches_reference(act, dtype, w, m):
    g, u = acts(m, w, dtype, seed=1 + w + m), acts(m, w, dtype, seed=2 + w + m)
    a, b = tables(w, seed=w + 7)
    s = slots(m)
    with K.kernel_mode("triton"):
        y = K.glu_map(g, u, a, b, s, act=act)
        y0 = K.glu_map(g, u, act=act)
    # torch's fp32 tanh-GELU, 0.5·g·(1 + tanh(z)), loses up to ~1e-5 relative to cancellation
    # for negative g (see test_gelu_tanh_formula_accuracy); the kernel's g·sigmoid(2z) does not.
    # At fp16 that rounds ~1% of all elements differently (measured 1.1% at W=2304, M=5).
    frac = 0.01 if act == "silu" else 0.03
    assert_close(y, K.glu_map_reference(g, u, a, b, s, act=act), max_off_frac=frac)
    assert_close(y0, K.glu_map_reference(g, u, act=act), max_off_frac=frac)
    # the reference is what HF computes (in fp32): act(gate) * up
    f = torch.nn.functional
    hf = (f.silu(g.float()) if act == "silu" else f.gelu(g.float(), approximate="tanh")) * u.float()
    assert torch.equal(K.glu_map_reference(g, u, act=act), hf.to(dtype))


@needs_triton
def test_gelu_tanh_formula_accuracy():
    """The kernel's tanh-GELU against float64 truth of the same formula (computed in the
    cancellation-free sigmoid form): fp32-accurate, and never worse than torch's fp32 gelu."""
    g = torch.linspace(-6, 6, 3001)[None]
    with K.kernel_mode("triton"):
        k = K.glu_map(g, torch.ones_like(g), act="gelu_tanh").double()
    g64 = g.double()
    z = (2 / torch.pi) ** 0.5 * (g64 + 0.044715 * g64**3)
    truth = g64 * torch.sigmoid(2 * z)
    rel_k = (k - truth).abs() / truth.abs().clamp_min(1e-30)
    torch_fp32 = torch.nn.functional.gelu(g, approximate="tanh").double()
    rel_t = (torch_fp32 - truth).abs() / truth.abs().clamp_min(1e-30)
    # fp32 rounding of z is amplified by |2z| in sigmoid(2z) for negative g (inherent to any
    # fp32 evaluation): bound the error by a few ulp times (1 + |2z|)
    bound = 3e-7 * (1 + 2 * z.abs())
    assert (rel_k <= bound).all(), float((rel_k / bound).max())
    assert rel_k.max() < rel_t.max(), (float(rel_k.max()), float(rel_t.max()))


# (gemma, post-norm of delta, map, final norm)
NORM_VARIANTS = {
    "llama": (False, False, True, True),
    "llama_nomap": (False, False, False, True),
    "llama_nonorm": (False, False, True, False),
    "gemma_post": (True, True, True, True),
    "gemma_post_nomap": (True, True, False, True),
    "gemma_post_nonorm": (True, True, True, False),
    "gemma_nopost": (True, False, True, True),
}


def _norm_inputs(dtype, w, m, seed):
    r = acts(m, w, dtype, seed=seed)
    d = acts(m, w, dtype, seed=seed + 1, scale=3.0)
    nw = (1.0 + 0.3 * torch.randn(w, generator=gen(seed + 2))).to(dtype)
    dnw = (0.2 * torch.randn(w, generator=gen(seed + 3))).to(dtype)
    return r, d, nw, dnw


@needs_triton
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("w", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(NORM_VARIANTS))
def test_add_rmsnorm_matches_reference(variant, dtype, w, m):
    gemma, post, has_map, has_norm = NORM_VARIANTS[variant]
    r, d, nw, dnw = _norm_inputs(dtype, w, m, seed=w + m)
    a, b = tables(w, seed=w + 11)
    kw = dict(gemma=gemma, delta_norm_w=dnw if post else None)
    if has_map:
        kw.update(a_tab=a, b_tab=b, slot=slots(m))
    norm_w = nw if has_norm else None
    with K.kernel_mode("triton"):
        s, n = K.add_map_rmsnorm(r, d, norm_w, EPS, **kw)
    s_ref, n_ref = K.add_map_rmsnorm_reference(r, d, norm_w, EPS, **kw)
    assert_close(s, s_ref)
    if has_norm:
        assert_close(n, n_ref)
    else:
        assert n is None and n_ref is None


def _hf_rmsnorm(x, w, eps, gemma):
    """Independent fp32 RMSNorm in HF's formulation (Gemma: (1 + w))."""
    x = x.float()
    var = x.pow(2).mean(-1, keepdim=True)
    y = x * torch.rsqrt(var + eps)
    return y * (1.0 + w.float()) if gemma else y * w.float()


@pytest.mark.parametrize("gemma", [False, True])
def test_add_rmsnorm_reference_is_the_formula(gemma):
    r, d, nw, dnw = _norm_inputs(torch.float32, 64, 5, seed=3)
    a, b = tables(64, seed=4)
    s_idx = slots(5).long()
    dd = _hf_rmsnorm(d, dnw, EPS, gemma) if gemma else d
    s = affine(r + dd, a[s_idx], b[s_idx])
    n = _hf_rmsnorm(s, nw, EPS, gemma)
    got = K.add_map_rmsnorm_reference(
        r, d, nw, EPS, a, b, slots(5), gemma=gemma, delta_norm_w=dnw if gemma else None
    )
    torch.testing.assert_close(got[0], s, rtol=0, atol=0)
    torch.testing.assert_close(got[1], n, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# identity rows are bit-identical to no steering
# ------------------------------------------------------------------------------------------
ID_SLOTS = torch.tensor([0, 1, 0, 2, 0], dtype=torch.int32)
ID_ROWS = ID_SLOTS == 0


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("w", (576, 2304))
def test_affine_identity_rows_exact(dtype, w):
    x = acts(5, w, dtype, seed=5)
    a, b = tables(w, seed=6)
    with K.kernel_mode("triton"):
        y = K.affine_map(x, a, b, ID_SLOTS)
    assert torch.equal(y[ID_ROWS], x[ID_ROWS])
    assert not torch.equal(y[~ID_ROWS], x[~ID_ROWS])


@needs_triton
@pytest.mark.parametrize("act", K.ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_glu_identity_rows_exact(act, dtype):
    w = 1536
    g, u = acts(5, w, dtype, seed=8), acts(5, w, dtype, seed=9)
    a, b = tables(w, seed=10)
    with K.kernel_mode("triton"):
        y = K.glu_map(g, u, a, b, ID_SLOTS, act=act)
        y0 = K.glu_map(g, u, act=act)
    assert torch.equal(y[ID_ROWS], y0[ID_ROWS])
    assert not torch.equal(y[~ID_ROWS], y0[~ID_ROWS])


@needs_triton
@pytest.mark.parametrize("gemma_post", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rmsnorm_identity_rows_exact(dtype, gemma_post):
    w = 640
    r, d, nw, dnw = _norm_inputs(dtype, w, 5, seed=12)
    a, b = tables(w, seed=13)
    kw = dict(gemma=gemma_post, delta_norm_w=dnw if gemma_post else None)
    with K.kernel_mode("triton"):
        s, n = K.add_map_rmsnorm(r, d, nw, EPS, a, b, ID_SLOTS, **kw)
        s0, n0 = K.add_map_rmsnorm(r, d, nw, EPS, **kw)
    assert torch.equal(s[ID_ROWS], s0[ID_ROWS]) and torch.equal(n[ID_ROWS], n0[ID_ROWS])
    assert not torch.equal(s[~ID_ROWS], s0[~ID_ROWS])
    if not gemma_post:  # the plain residual add, as torch computes it in the storage dtype
        assert torch.equal(s[ID_ROWS], (r + d)[ID_ROWS])
        assert torch.equal(s0, r + d)


# ------------------------------------------------------------------------------------------
# shapes and tables
# ------------------------------------------------------------------------------------------
@needs_triton
def test_uniform_table_and_nd_input_and_int64_slot():
    w = 576
    x = acts(6, w, torch.bfloat16, seed=20).reshape(2, 3, w)
    a, b = tables(w, seed=21, s=2)
    a1, b1 = a[1:], b[1:]  # one-row table, all slots 0
    zero = torch.zeros(6, dtype=torch.int32)
    with K.kernel_mode("triton"):
        y = K.affine_map(x, a1, b1, zero)
        y64 = K.affine_map(x, a, b, torch.ones(2, 3, dtype=torch.int64))
        g = K.glu_map(x, x, a1, b1, zero, act="gelu_tanh")
        s, n = K.add_map_rmsnorm(x, x, torch.ones(w), EPS, a1, b1, zero)
    assert y.shape == x.shape and g.shape == x.shape and s.shape == x.shape == n.shape
    assert torch.equal(y, y64)
    assert_close(y, (a1[0] * x.float() + b1[0]).to(x.dtype))
    assert_close(g, K.glu_map_reference(x, x, a1, b1, zero, act="gelu_tanh"))
    assert_close(n, K.add_map_rmsnorm_reference(x, x, torch.ones(w), EPS, a1, b1, zero)[1])


@needs_triton
def test_out_of_range_slot():
    w = 64
    x = acts(3, w, torch.float32, seed=30)
    a, b = tables(w, seed=31)
    bad = torch.tensor([0, 3, -1], dtype=torch.int32)
    # CPU: a clear error before any kernel runs, on every path
    for mode in ("triton", "torch"):
        with K.kernel_mode(mode):
            with pytest.raises(K.KernelInputError, match=r"slot values must lie in \[0, 3\)"):
                K.affine_map(x, a, b, bad)
            with pytest.raises(K.KernelInputError, match="slot values"):
                K.glu_map(x, x, a, b, bad)
            with pytest.raises(K.KernelInputError, match="slot values"):
                K.add_map_rmsnorm(x, x, torch.ones(w), EPS, a, b, bad)
    # the kernels themselves (what runs on a GPU, where the check would cost a sync):
    # never read outside the table, and turn exactly the bad rows into NaN
    with K.kernel_mode("triton"):
        y = _affine_triton(x, a, b, bad)
        g = _glu_triton(x, x, a, b, bad, "silu")
        s, n = _add_rmsnorm_triton(x, x, torch.ones(w), EPS, a, b, bad, False, None)
    for out in (y, g, s, n):
        assert not out[0].isnan().any() and out[1:].isnan().all()
    assert torch.equal(y[0], x[0])


def test_m_zero_rows():
    x = torch.empty(0, 64)
    a, b = tables(64, seed=1)
    empty_slot = torch.empty(0, dtype=torch.int32)
    for mode in ("torch",) + (("triton",) if C.HAVE_TRITON else ()):
        with K.kernel_mode(mode):
            assert K.affine_map(x, a, b, empty_slot).shape == (0, 64)
            assert K.glu_map(x, x, a, b, empty_slot).shape == (0, 64)
            s, n = K.add_map_rmsnorm(x, x, torch.ones(64), EPS, a, b, empty_slot)
            assert s.shape == n.shape == (0, 64)


# ------------------------------------------------------------------------------------------
# bad input -> KernelInputError with a specific message
# ------------------------------------------------------------------------------------------
def _bad_calls():
    w = 64
    x = torch.randn(3, w)
    a, b = tables(w, seed=0)
    s = torch.zeros(3, dtype=torch.int32)
    one = torch.ones(w)
    return [
        ("width", lambda: K.affine_map(x, a[:, :32], b[:, :32], s), r"a_tab must have shape \[S, 64\]"),
        ("table dtype", lambda: K.affine_map(x, a.double(), b.double(), s), "a_tab must be float32"),
        ("table pair", lambda: K.affine_map(x, a, b[:2], s), "differ in shape"),
        ("slot count", lambda: K.affine_map(x, a, b, s[:2]), "slot has 2 entries but the input has 3 rows"),
        ("slot dtype", lambda: K.affine_map(x, a, b, s.float()), "slot must be int32 or int64"),
        ("x dtype", lambda: K.affine_map(x.long(), a, b, s), "x has dtype torch.int64"),
        ("x 0-d", lambda: K.affine_map(torch.tensor(1.0), a, b, s), "0-d"),
        ("x type", lambda: K.affine_map([1.0], a, b, s), "x must be a torch.Tensor"),
        ("partial map", lambda: K.glu_map(x, x, a, b, None), "must be given together"),
        ("act", lambda: K.glu_map(x, x, act="relu"), "act 'relu'"),
        ("gate/up", lambda: K.glu_map(x, x[:, :32]), "up has shape"),
        ("gate/up dtype", lambda: K.glu_map(x, x.half()), "up has dtype"),
        ("residual/delta", lambda: K.add_map_rmsnorm(x, x[:2], one, EPS), "delta has shape"),
        ("norm_w", lambda: K.add_map_rmsnorm(x, x, one[:10], EPS), r"norm_w must have shape \[64\]"),
        ("delta_norm_w", lambda: K.add_map_rmsnorm(x, x, one, EPS, delta_norm_w=one[None]), "delta_norm_w must"),
        ("eps", lambda: K.add_map_rmsnorm(x, x, one, -1.0), "eps must be a finite float"),
        ("eps none-norm", lambda: K.add_map_rmsnorm(x, x, None, float("nan")), "eps must be"),
        ("eps type", lambda: K.add_map_rmsnorm(x, x, one, "1e-6"), "eps must be a float"),
        ("gemma type", lambda: K.add_map_rmsnorm(x, x, one, EPS, gemma=1), "gemma must be a bool"),
        ("norm_w type", lambda: K.add_map_rmsnorm(x, x, [1.0], EPS), "norm_w must be a torch.Tensor"),
        ("missing table", lambda: K.affine_map(x, None, b, s), "are required"),
    ]


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_bad_inputs_raise_kernel_input_error(mode):
    if mode == "triton" and not C.HAVE_TRITON:
        pytest.skip("triton is not installed")
    with K.kernel_mode(mode):
        for name, call, msg in _bad_calls():
            with pytest.raises(K.KernelInputError, match=msg):
                call()
    assert issubclass(K.KernelInputError, ValueError)


# ------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------
def test_dispatch_modes(monkeypatch):
    x = acts(5, 64, torch.bfloat16, seed=40)
    a, b = tables(64, seed=41)
    s = slots(5)
    ref = K.affine_map_reference(x, a, b, s)
    with K.kernel_mode("torch"):
        assert K.get_kernel_mode() == "torch"
        assert not C.use_triton(torch.device("cpu"))
        assert torch.equal(K.affine_map(x, a, b, s), ref)
    assert K.get_kernel_mode() == "auto"
    with pytest.raises(K.KernelInputError, match="kernel mode 'fast'"):
        K.set_kernel_mode("fast")

    # interpreter off: auto falls back to the reference on CPU, forcing triton is a clear error
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not K.triton_available("cpu")
    assert not C.use_triton(torch.device("cpu"))
    assert torch.equal(K.affine_map(x, a, b, s), ref)
    with K.kernel_mode("triton"):
        with pytest.raises(K.KernelUnavailableError, match="TRITON_INTERPRET=1"):
            K.affine_map(x, a, b, s)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert C.use_triton(torch.device("cpu")) == C.HAVE_TRITON


# ------------------------------------------------------------------------------------------
# custom ops: torch.ops.fusesteer.*, opcheck, torch.compile
# ------------------------------------------------------------------------------------------
def _op_samples():
    w = 64
    x = acts(3, w, torch.float32, seed=50)
    xb = acts(3, w, torch.bfloat16, seed=51)
    a, b = tables(w, seed=52)
    s = torch.tensor([0, 2, 1], dtype=torch.int32)
    nw = torch.randn(w, generator=gen(53))
    return [
        (torch.ops.fusesteer.affine_map.default, (x, a, b, s)),
        (torch.ops.fusesteer.affine_map.default, (xb, a, b, s)),
        (torch.ops.fusesteer.glu_map.default, (x, x, a, b, s, "silu")),
        (torch.ops.fusesteer.glu_map.default, (xb, xb, None, None, None, "gelu_tanh")),
        (torch.ops.fusesteer.add_map_rmsnorm.default, (x, x, nw, EPS, a, b, s, False, None)),
        (torch.ops.fusesteer.add_map_rmsnorm.default, (xb, xb, nw, EPS, None, None, None, True, nw)),
        (torch.ops.fusesteer.add_map.default, (x, x, EPS, a, b, s, True, nw)),
    ]


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_opcheck(mode):
    if mode == "triton" and not C.HAVE_TRITON:
        pytest.skip("triton is not installed")
    with K.kernel_mode(mode):
        for op, args in _op_samples():
            torch.library.opcheck(op, args)


def _steered_block(x, r, nw, a, b, slot, ga, gb, gslot):
    h = K.affine_map(x, a, b, slot)
    g = K.glu_map(h, x, ga, gb, gslot, act="gelu_tanh")
    s, n = K.add_map_rmsnorm(r, g, nw, EPS, a, b, slot, gemma=True, delta_norm_w=nw)
    s_last, none = K.add_map_rmsnorm(s, n, None, EPS, a, b, slot)
    assert none is None
    return s_last, n


def test_torch_compile_fullgraph():
    import torch._dynamo

    torch._dynamo.reset()
    w = 64
    x, r = acts(3, w, torch.float32, seed=60), acts(3, w, torch.float32, seed=61)
    nw = 0.1 * torch.randn(w, generator=gen(62))
    a, b = tables(w, seed=63)
    slot = torch.tensor([0, 2, 1], dtype=torch.int32)
    ga, gb = tables(w, seed=64, s=1)
    gslot = torch.zeros(3, dtype=torch.int32)
    args = (x, r, nw, a, b, slot, ga, gb, gslot)
    compiled = torch.compile(_steered_block, fullgraph=True)
    with K.kernel_mode("torch"):
        eager = _steered_block(*args)
        out = compiled(*args)
    for o, e in zip(out, eager):
        torch.testing.assert_close(o, e, rtol=1e-6, atol=1e-6)

    # new table values and slots are plain tensor inputs: no recompilation; the op stays opaque,
    # so the same compiled graph can run the Triton kernels (interpreter) too
    a2, b2 = tables(w, seed=65)
    slot2 = torch.tensor([1, 1, 0], dtype=torch.int32)
    args2 = (x, r, nw, a2, b2, slot2, ga, gb, gslot)
    with torch._dynamo.config.patch(error_on_recompile=True):
        with K.kernel_mode("torch"):
            out2 = compiled(*args2)
            eager2 = _steered_block(*args2)
        if C.HAVE_TRITON:
            with K.kernel_mode("triton"):
                out3 = compiled(*args2)
            for o, e in zip(out3, eager2):  # three chained ops: a few fp32 ulp apart
                torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)
    for o, e in zip(out2, eager2):
        torch.testing.assert_close(o, e, rtol=1e-6, atol=1e-6)
    assert not torch.equal(out2[0], out[0])


def test_torch_compile_dynamic_rows():
    import torch._dynamo

    torch._dynamo.reset()
    w = 64
    a, b = tables(w, seed=70)

    def f(x, slot):
        return K.affine_map(x, a, b, slot)

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    with K.kernel_mode("torch"):
        for m in (3, 5, 7):
            x = acts(m, w, torch.float32, seed=m)
            slot = torch.arange(m, dtype=torch.int32) % 3
            torch.testing.assert_close(compiled(x, slot), f(x, slot), rtol=0, atol=0)
        # raised by the fake impl at trace time (sizes are symbolic there), wrapped by dynamo
        with pytest.raises(Exception, match="slot has s\\d+ entries but the input has s\\d+ rows"):
            compiled(acts(5, w, torch.float32, seed=1), torch.zeros(4, dtype=torch.int32))
