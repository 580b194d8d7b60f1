"""Kernel parity and bandwidth on a CUDA GPU (steps of ``fusesteer bench gpu``).

Parity: every kernel (add_rmsnorm with Llama / Gemma norms, glu with SiLU / tanh-GELU, affine) x fp32 / fp16 /
bf16 x map (none, uniform, 8 per-row plans) x the widths of SmolLM2-135M, Gemma-3-270M and Llama-3-8B x 1, 8
and 67 rows, the Triton kernel (``kernel_mode("triton")``) against the torch reference on the same CUDA
tensors. Tolerances (the GPU's ``rsqrt`` / ``exp`` are approximate and ``a*x + b`` may become an FMA, see
tests/test_kernels.py): fp32 ``|d| <= 1e-5 + 1e-5 |ref|``; fp16 / bf16 at most 1 ulp of the storage type
apart, and at most 1% (3% for tanh-GELU at fp16, whose torch reference loses ~1e-5 to cancellation) of the
elements 1 ulp off.

Bandwidth: each kernel at Llama-3-8B widths (and the small models' widths) x 8 and 4096 rows, bf16 and fp32,
timed with CUDA events over ``INNER`` back-to-back launches captured in one CUDA graph (device time; the eager
time per call, host overhead included, is recorded too); GB/s = the bytes the kernel must move
(:func:`fusesteer.bench.traffic.call_bytes`) / time, and % of the peak from NVML (or a measured device-to-device
copy when pynvml is missing, said so in the result).
"""

from __future__ import annotations

import functools

import torch

from ..tolerances import KERNEL_FP32_GPU, KERNEL_ONE_ULP_FRACTION, kernel_parity
from . import traffic as TR

DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PARITY_WIDTHS = {"add_rmsnorm": (576, 640, 4096), "glu": (1536, 2048, 14336), "affine": (576, 1024, 4096)}
PARITY_ROWS = (1, 8, 67)
BW_SHAPES = {"add_rmsnorm": ((8, 4096), (4096, 4096), (4096, 576)), "glu": ((8, 14336), (4096, 14336),
                                                                          (4096, 1536)),
             "affine": ((8, 4096), (4096, 4096), (4096, 576))}
BW_DTYPES = ("bf16", "fp32")
INNER = 50
PLANS = 8  # per-row maps: 8 plans -> table rows 1 + 2 x 8 as the backend builds them


def parity_cases() -> list[dict]:
    out = []
    for kernel, widths in PARITY_WIDTHS.items():
        fams = ("llama", "gemma") if kernel != "affine" else (None,)
        maps = ("none", "uniform", "per-row") if kernel != "affine" else ("uniform", "per-row")
        for fam in fams:
            for map_ in maps:
                for dtype in DT:
                    for w in widths:
                        for m in PARITY_ROWS:
                            out.append({"kernel": kernel, "family": fam, "map": map_, "dtype": dtype, "width": w,
                                        "rows": m})
    return out


def bandwidth_cases() -> list[dict]:
    out = []
    for kernel, shapes in BW_SHAPES.items():
        for map_ in ("uniform", "per-row"):
            for dtype in BW_DTYPES:
                for m, w in shapes:
                    out.append({"kernel": kernel, "family": "llama" if kernel != "affine" else None, "map": map_,
                                "dtype": dtype, "width": w, "rows": m})
    return out


def _gen(seed):
    return torch.Generator().manual_seed(int(seed))


def make_inputs(case: dict, device, seed: int = 0) -> dict:
    """Tensors for one case (built on CPU from a seed, then moved)."""
    m, w, dt = case["rows"], case["width"], DT[case["dtype"]]
    g = _gen(seed + 7 * w + m)

    def act(scale=2.0):
        return (scale * torch.randn(m, w, generator=g)).to(dt).to(device)
    kw = {}
    if case["map"] != "none":
        S = 1 if case["map"] == "uniform" else 1 + 2 * PLANS
        a = 1.0 + (torch.rand(S, w, generator=g) - 0.5)
        b = 0.5 * torch.randn(S, w, generator=g)
        a[0], b[0] = 1.0, 0.0
        slot = (torch.zeros(m, dtype=torch.int32) if S == 1 else
                (torch.arange(m, dtype=torch.int32) % (S - 1)) + 1)
        kw = {"a_tab": a.to(device), "b_tab": b.to(device), "slot": slot.to(device)}
    if case["kernel"] == "add_rmsnorm":
        gemma = case["family"] == "gemma"
        nw = (1.0 + 0.3 * torch.randn(w, generator=g)).to(dt).to(device)
        dnw = (0.2 * torch.randn(w, generator=g)).to(dt).to(device) if gemma else None
        return {"args": (act(), act(), nw, 1e-6), "kw": dict(kw, gemma=gemma, delta_norm_w=dnw)}
    if case["kernel"] == "glu":
        act_fn = "silu" if case["family"] == "llama" else "gelu_tanh"
        return {"args": (act(), act()), "kw": dict(kw, act=act_fn)}
    return {"args": (act(),), "kw": kw}


def _fns(kernel: str):
    from fusesteer import kernels as K

    return {"add_rmsnorm": (K.add_map_rmsnorm, K.add_map_rmsnorm_reference),
            "glu": (K.glu_map, K.glu_map_reference),
            "affine": (K.affine_map, K.affine_map_reference)}[kernel]


def _call(fn, kernel, inp):
    if kernel == "affine":
        return fn(*inp["args"], inp["kw"]["a_tab"], inp["kw"]["b_tab"], inp["kw"]["slot"])
    return fn(*inp["args"], **inp["kw"])


def compare(out: torch.Tensor, ref: torch.Tensor, max_off_frac: float = KERNEL_ONE_ULP_FRACTION) -> dict:
    """Parity record of one output against its reference (the GPU rule of :mod:`fusesteer.tolerances`)."""
    return kernel_parity(out, ref, fp32=KERNEL_FP32_GPU, max_off_frac=max_off_frac)


def run_parity(cases: list[dict], device, mode: str = "triton", progress: bool = True) -> list[dict]:
    """Kernel (under ``kernel_mode(mode)``) vs reference for every case; one record per case and output."""
    from tqdm.auto import tqdm

    from fusesteer.kernels import kernel_mode

    out = []
    for case in tqdm(cases, desc="kernel parity", disable=not progress, leave=False):
        fn, ref_fn = _fns(case["kernel"])
        inp = make_inputs(case, device)
        frac = 0.03 if (case["kernel"] == "glu" and case["family"] == "gemma") else 0.01
        rec = dict(case)
        try:
            with torch.inference_mode(), kernel_mode(mode):
                got = _call(fn, case["kernel"], inp)
            with torch.inference_mode():
                want = _call(ref_fn, case["kernel"], inp)
            if case["kernel"] == "add_rmsnorm":
                rs = compare(got[0], want[0], frac)
                rn = compare(got[1], want[1], frac)
                rec.update(s=rs, normed=rn, ok=rs["ok"] and rn["ok"])
            else:
                r = compare(got, want, frac)
                rec.update(out=r, ok=r["ok"])
        except Exception as e:  # noqa: BLE001 - reported per case
            rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:400])
        out.append(rec)
    return out


@functools.lru_cache(maxsize=1)
def peak_bandwidth() -> tuple[float, str]:
    """(bytes/s, source): NVML's theoretical peak if pynvml is available, else a measured D2D copy."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(h)
        return 2.0 * clock_mhz * 1e6 * bus_bits / 8, "NVML theoretical (2 x memory clock x bus width)"
    except Exception:  # noqa: BLE001 - fall back to a measurement
        pass
    n = 256 * 2 ** 20
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    end.synchronize()
    sec = start.elapsed_time(end) / 1e3 / 20
    return 2.0 * n / sec, "measured device-to-device copy (read + write), not the theoretical peak"


def case_bytes(case: dict) -> int:
    b = TR.kernel_bytes(case["kernel"], case["dtype"], case["width"], case["map"], case["family"])
    return TR.call_bytes(b, case["rows"], case["map"], PLANS)


def _time_loop(call, inner: int, repeats: int) -> float:
    """Median seconds per call of ``inner`` back-to-back eager calls (host launch overhead included)."""
    import statistics

    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


def _time_graph(call, inner: int, repeats: int) -> float:
    """Median seconds per call of ``inner`` calls captured in one CUDA graph (device time, no host overhead)."""
    import statistics

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            call()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


def run_bandwidth(cases: list[dict], device, inner: int = INNER, repeats: int = 5, progress: bool = True) -> dict:
    """GB/s and % of peak per case: the median of ``repeats`` timings of ``inner`` launches captured in a
    CUDA graph (device time; falls back to eager launches, said so per case), and the eager time per call."""
    from tqdm.auto import tqdm

    from fusesteer.kernels import kernel_mode

    peak, src = peak_bandwidth()
    rows = []
    for case in tqdm(cases, desc="kernel bandwidth", disable=not progress, leave=False):
        fn, _ = _fns(case["kernel"])
        inp = make_inputs(case, device)
        rec = dict(case, bytes=case_bytes(case))

        def call(fn=fn, case=case, inp=inp):
            return _call(fn, case["kernel"], inp)
        try:
            with torch.inference_mode(), kernel_mode("triton"):
                for _ in range(3):
                    call()  # compile + warm up
                torch.cuda.synchronize()
                eager = _time_loop(call, inner, repeats)
                try:
                    sec, timer = _time_graph(call, inner, repeats), "CUDA graph of back-to-back launches"
                except Exception as e:  # noqa: BLE001 - capture can fail on odd setups: use the eager timing
                    sec, timer = eager, f"eager launches (CUDA graph capture failed: {type(e).__name__})"
            rec.update(us_per_call=sec * 1e6, us_per_call_eager=eager * 1e6, timer=timer,
                       GB_per_s=rec["bytes"] / sec / 1e9, frac_peak=rec["bytes"] / sec / peak,
                       roofline_us=rec["bytes"] / peak * 1e6)
        except Exception as e:  # noqa: BLE001 - reported per case
            rec.update(error=f"{type(e).__name__}: {e}"[:400])
        rows.append(rec)
    return {"peak_GB_per_s": peak / 1e9, "peak_source": src, "inner_launches": inner, "cases": rows}
