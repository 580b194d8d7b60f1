"""Kernel microbenchmarks (pytest-benchmark): each fused steering kernel vs the unfused torch sequence it
replaces, with achieved GB/s and the fraction of the GPU's peak memory bandwidth.

Run on a CUDA machine from the root of a source checkout (not collected by the default test run, whose testpaths
is tests/; not part of the installed package; needs pytest-benchmark, the ``bench`` extra):

    pytest bench/test_kernels_bench.py --benchmark-group-by=group --benchmark-columns=median,iqr,ops

Each benchmark group holds one op at one shape and dtype, ``fused`` next to ``unfused``; ``extra_info``
carries ``us_per_op``, ``bytes`` (the minimum the op must move: inputs read once, outputs written once, the
used plan-table rows), ``GB_per_s`` and ``frac_peak`` (against the theoretical peak from NVML when pynvml is
installed, else against a measured device-to-device copy, which is stated in ``peak_source``).

On CPU everything is skipped: the Triton kernels run there only through the interpreter, which is about a
thousand times slower than compiled code and measures nothing about the kernels' speed.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fusesteer.bench.gpu_kernels import peak_bandwidth  # one definition, shared with `fusesteer bench gpu`

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="kernel microbenchmarks need CUDA: on CPU the Triton kernels run only in the interpreter "
           "(~1000x slower), which is not a speed measure")

INNER = 50  # kernel launches per timed call (one synchronize per call)
SHAPES = [(1, 4096), (8, 4096), (256, 4096), (4096, 4096), (8, 14336)]  # (rows M = tokens, width W)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _tables(W, S=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (1 + 0.2 * torch.randn(S, W, generator=g)).cuda()
    b = (0.1 * torch.randn(S, W, generator=g)).cuda()
    a[0], b[0] = 1, 0
    return a, b


def _slots(M, per_row):
    if per_row:
        return (torch.arange(M, dtype=torch.int32) % 2 + 1).cuda()
    return torch.ones(M, dtype=torch.int32).cuda()


def _run(benchmark, fn, nbytes, group):
    from fusesteer.kernels import kernel_mode

    def many():
        for _ in range(INNER):
            fn()
        torch.cuda.synchronize()

    with kernel_mode("triton"):
        for _ in range(3):
            many()  # compile + warm up
        benchmark.group = group
        benchmark.pedantic(many, rounds=30, iterations=1, warmup_rounds=2)
    sec = benchmark.stats.stats.median / INNER
    peak, src = peak_bandwidth()
    benchmark.extra_info.update(us_per_op=sec * 1e6, bytes=nbytes, GB_per_s=nbytes / sec / 1e9,
                                frac_peak=nbytes / sec / peak, peak_GB_per_s=peak / 1e9, peak_source=src,
                                device=torch.cuda.get_device_name())


def _rmsnorm_hf(x, w, eps):
    """HF LlamaRMSNorm: fp32 statistics, weight times the input-dtype result."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


@pytest.mark.parametrize("per_row", [False, True], ids=["uniform", "per-row"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("M,W", SHAPES, ids=[f"{m}x{w}" for m, w in SHAPES])
@pytest.mark.parametrize("impl", ["fused", "unfused"])
def test_add_map_rmsnorm(benchmark, impl, M, W, dtype, per_row):
    from fusesteer.kernels import add_map_rmsnorm

    dt = DTYPES[dtype]
    r = torch.randn(M, W, device="cuda", dtype=dt)
    d = torch.randn(M, W, device="cuda", dtype=dt)
    w = (1 + 0.1 * torch.randn(W, device="cuda")).to(dt)
    A, B = _tables(W)
    sl = _slots(M, per_row)
    eps = 1e-6
    if impl == "fused":
        fn = functools.partial(add_map_rmsnorm, r, d, w, eps, A, B, sl)
    else:
        idx = sl.long()

        def fn():
            s = r + d
            s = (A[idx] * s.float() + B[idx]).to(dt)
            return s, _rmsnorm_hf(s, w, eps)
    e = r.element_size()
    nbytes = 4 * M * W * e + W * e + 2 * W * 4 * (2 if per_row else 1)
    _run(benchmark, fn, nbytes, f"add_map_rmsnorm {M}x{W} {dtype} {'per-row' if per_row else 'uniform'}")


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("M,W", SHAPES, ids=[f"{m}x{w}" for m, w in SHAPES])
@pytest.mark.parametrize("impl", ["fused", "unfused"])
def test_glu_map(benchmark, impl, M, W, dtype, act):
    from fusesteer.kernels import glu_map

    dt = DTYPES[dtype]
    g = torch.randn(M, W, device="cuda", dtype=dt)
    u = torch.randn(M, W, device="cuda", dtype=dt)
    A, B = _tables(W)
    sl = _slots(M, False)
    if impl == "fused":
        fn = functools.partial(glu_map, g, u, A[1:2], B[1:2], torch.zeros_like(sl), act)
    else:
        a, b = A[1], B[1]
        f = torch.nn.functional.silu if act == "silu" else functools.partial(torch.nn.functional.gelu,
                                                                               approximate="tanh")

        def fn():
            m = f(g) * u
            return (a * m.float() + b).to(dt)
    e = g.element_size()
    nbytes = 3 * M * W * e + 2 * W * 4
    _run(benchmark, fn, nbytes, f"glu_map {M}x{W} {dtype} {act}")


@pytest.mark.parametrize("per_row", [False, True], ids=["uniform", "per-row"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("M,W", SHAPES, ids=[f"{m}x{w}" for m, w in SHAPES])
@pytest.mark.parametrize("impl", ["fused", "unfused"])
def test_affine_map(benchmark, impl, M, W, dtype, per_row):
    from fusesteer.kernels import affine_map

    dt = DTYPES[dtype]
    x = torch.randn(M, W, device="cuda", dtype=dt)
    A, B = _tables(W)
    sl = _slots(M, per_row)
    if impl == "fused":
        fn = functools.partial(affine_map, x, A, B, sl)
    else:
        idx = sl.long()

        def fn():
            return (A[idx] * x.float() + B[idx]).to(dt)
    e = x.element_size()
    nbytes = 2 * M * W * e + 2 * W * 4 * (2 if per_row else 1)
    _run(benchmark, fn, nbytes, f"affine_map {M}x{W} {dtype} {'per-row' if per_row else 'uniform'}")
