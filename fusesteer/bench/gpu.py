"""`fusesteer bench gpu`: the GPU checks in one command (one NVIDIA GPU, about 10 minutes; `--dry-run` on any
machine prints every step and builds everything that does not need the GPU).

Steps, in order (each is skipped with a note when the time budget, ``--budget`` seconds, would be exceeded):

1. environment: GPU, capability, CUDA / torch / triton versions, peak HBM bandwidth (NVML or a measured copy);
2. kernel parity on CUDA: every kernel x dtype x map x widths x rows against its torch reference
   (:mod:`fusesteer.bench.gpu_kernels`);
3. kernel bandwidth: GB/s and % of peak per kernel at Llama-3-8B and small-model widths;
4. per model (SmolLM2-135M, Gemma-3-270M; bf16): the steered arm's logits against the ``reference`` hooks
   (bench parity threshold), then steered/vanilla decode-step ratios for an all-layer ``layer.out`` blend
   + k = 100 gains (batch 1 and 8) and for 8 per-row plans (batch 8):
   * eager: vanilla and a steered copy of the model (``triton`` backend attached once), each with its own
     KV cache, decode steps interleaved in random order and timed with CUDA events (median of paired
     ratios, bootstrap 95% CI);
   * CUDA graphs: the same with a static KV cache and ``torch.compile(mode="reduce-overhead")``, then the
     zero-recompile check: ``handle.update()`` with new values must add no graph, frame or recompile and
     must change the logits.
5. ``gpu-<device>.json`` and ``gpu-<device>.png`` (kernel % of peak; ratios eager vs CUDA graphs next to the
   ratio the traffic model predicts, :mod:`fusesteer.bench.traffic`) in ``--out`` (default: the results folder,
   see :mod:`fusesteer.bench.paths`).

Exit status: 0 when every parity check and zero-recompile check passed, 1 otherwise, 2 on a usage error
(no CUDA device without ``--dry-run``).
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import fusesteer as fs
from fusesteer.runtime.compat import output_cache, with_cache

from .. import tolerances as TH
from . import common as C
from . import gpu_kernels as GK
from . import traffic as TR
from .paths import resolve_out

MODELS = ("smollm2-135m", "gemma3-270m")
SCENARIOS = (("blend+gains", 1), ("blend+gains", 8), ("per-row", 8))
#: rough seconds per step on an H100-class GPU (for the budget check and the dry-run listing)
ESTIMATES = {"environment": 5, "kernel parity": 60, "kernel bandwidth": 40, "load": 15, "model parity": 5,
             "eager": 15, "compiled": 50}


@dataclass
class GPUConfig:
    device: str = "cuda"
    models: tuple = MODELS
    dtype: str = "bf16"
    cycles: int = 200
    warmup: int = 10
    prompt_len: int = 32
    budget_s: float = 600.0
    backend: str = "triton"
    compile_mode: str | None = "reduce-overhead"
    compile_backend: str = "inductor"
    kernel_mode: str = "triton"
    kernel_cases: int | None = None  # first N parity cases (smoke tests); None = all
    scenarios: tuple = SCENARIOS
    bandwidth: bool = True
    dry_run: bool = False
    progress: bool = True
    out: Path | None = None
    log: object = print


def device_tag(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


# --------------------------------------------------------------------------------------------------
# models, plans, steps
# --------------------------------------------------------------------------------------------------
def load_model(name: str, dtype: str, device) -> C.Loaded:
    if name.startswith("tiny-"):
        loaded = C.tiny_model(name[len("tiny-"):], "fp32" if dtype == "int8" else dtype)
        loaded.model.to(device)
        return loaded
    return C.real_model(name, dtype, torch.device(device))


def scenario_plans(model, seed: int = 0) -> dict:
    """The plans of the decode scenarios, and a second set with new values (same sites) for update()."""
    return {"blend+gains": (C.blend_gains_plan(model, seed=seed, k=100), C.blend_gains_plan(model, seed=seed + 1,
                                                                                              k=100)),
            "per-row": (C.per_row_plans(model, 8, seed=seed, k=100), C.per_row_plans(model, 8, seed=seed + 1, k=100))}


def attach_steered(model, plan, backend: str, rows=None):
    """A deep copy of ``model`` with ``plan`` attached (``rows``: per-row routing). Returns (copy, handle)."""
    steered = copy.deepcopy(model)
    h = fs.attach(steered, plan, backend=backend, check_finite=False)
    if rows is not None:
        h.route(rows)
    return steered, h


def _update(handle, plan2) -> None:
    if isinstance(plan2, dict):
        for name, p in plan2.items():
            handle.update(name, p)
    else:
        handle.update(plan2)


def model_parity(loaded: C.Loaded, plan, rows, ids, backend: str) -> dict:
    """max |logit(backend) - logit(reference hooks)| over one prefill, against the bench's parity threshold."""
    model = loaded.model
    B, T = ids.shape
    pos = torch.arange(T, device=ids.device).expand(B, T)
    outs = {}
    for arm in (backend, "reference"):
        m, h = attach_steered(model, plan, arm, rows)
        with torch.inference_mode():
            outs[arm] = m(input_ids=ids, position_ids=pos).logits.float()
        h.detach()
        del m
    with torch.inference_mode():
        van = model(input_ids=ids, position_ids=pos).logits.float()
    ref = outs["reference"]
    diff = float((outs[backend] - ref).abs().max())
    tol = TH.logit_tolerance(loaded.dtype, backend, float(ref.abs().max()))
    effect = float((ref - van).abs().max())
    ok = diff <= tol and effect > TH.MIN_EFFECT and bool(torch.isfinite(outs[backend]).all())
    return {"max_abs": diff, "tolerance": tol, "plan_effect": effect, "ok": ok}


def eager_ratio(model, plan, rows, ids, backend: str, cycles: int, warmup: int, progress: bool = False) -> dict:
    """Eager decode steps: vanilla vs a steered copy, each with its own cache (the 'copies' protocol)."""
    from fusesteer.timing import crop_cache, paired_steps

    steered, h = attach_steered(model, plan, backend, rows)
    try:
        B, T = ids.shape
        dev = ids.device
        steps, caches = {}, []
        with torch.inference_mode():
            for name, m in (("vanilla", model), ("steered", steered)):
                out = m(input_ids=ids, position_ids=torch.arange(T, device=dev).expand(B, T), use_cache=True)
                cache = output_cache(out)
                caches.append(cache)
                nxt = out.logits[:, -1:].argmax(-1)
                pos = torch.full_like(nxt, T)

                def step(m=m, nxt=nxt, pos=pos, cache=cache):
                    with torch.inference_mode():
                        m(input_ids=nxt, position_ids=pos, use_cache=True, **with_cache(m, cache))
                steps[name] = step

        def crop():
            for c in caches:
                crop_cache(c, T)
        res = paired_steps(steps, {"vanilla": None, "steered": None}, cycles=cycles, warmup=warmup, device=dev,
                           after_step=crop, progress=progress, desc="eager decode steps")
        return {n: r.summary() for n, r in res.items()}
    finally:
        h.detach()


def compiled_step(m, ids, mode: str | None, compile_backend: str) -> dict:
    """A static-cache decode step of ``m`` under ``torch.compile`` (prefilled, compiled and, with
    ``mode="reduce-overhead"``, recorded as a CUDA graph): {"step", "rewind", "compile"}."""
    from transformers import StaticCache

    from .latency import _dynamo_counts, rewind_static_cache

    dev = ids.device
    B, T = ids.shape
    cache = StaticCache(config=m.config, max_cache_len=T + 8)
    with torch.no_grad():
        o = m(input_ids=ids, position_ids=torch.arange(T, device=dev).expand(B, T), use_cache=True,
              **with_cache(m, cache))
    nxt = o.logits[:, -1:].argmax(-1)
    pos = torch.tensor([T], device=dev)
    compiled = torch.compile(m.forward, dynamic=False, backend=compile_backend, **({"mode": mode} if mode else {}))
    graphs = mode == "reduce-overhead"

    def step():
        if graphs:  # a new iteration for cudagraph trees: the previous replay's outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            return compiled(input_ids=nxt, position_ids=pos.expand(B, 1), use_cache=True,
                            **with_cache(m, cache)).logits

    def rewind():  # outside the timed call: the next step writes the same cache slot again
        rewind_static_cache(cache, T)

    c0, t0 = _dynamo_counts(), time.perf_counter()
    for _ in range(3):  # compile + (CUDA graphs) warm-up and record
        step()
        rewind()
    c1 = _dynamo_counts()
    return {"step": step, "rewind": rewind,
            "compile": {**{k: c1[k] - c0[k] for k in c1}, "compile_s": round(time.perf_counter() - t0, 1)}}


def compiled_ratio(model, plan, plan2, rows, ids, backend: str, mode: str | None, compile_backend: str,
                   cycles: int, warmup: int, progress: bool = False, vanilla: dict | None = None) -> dict:
    """Static cache + ``torch.compile``: vanilla vs steered decode steps, then the zero-recompile check:
    ``handle.update(plan2)`` must add no graph / frame / recompile and must change the logits. ``vanilla``:
    a :func:`compiled_step` of the unsteered model at this batch to reuse (it is compiled once per batch)."""
    from fusesteer.timing import paired_steps

    from .latency import _dynamo_counts

    steered, h = attach_steered(model, plan, backend, rows)
    try:
        van = vanilla or compiled_step(model, ids, mode, compile_backend)
        ste = compiled_step(steered, ids, mode, compile_backend)

        def rewind():
            van["rewind"]()
            ste["rewind"]()
        res = paired_steps({"vanilla": van["step"], "steered": ste["step"]}, {"vanilla": None, "steered": None},
                           cycles=cycles, warmup=warmup, device=ids.device, after_step=rewind, progress=progress,
                           desc="compiled decode steps")
        before = _dynamo_counts()
        logits_before = ste["step"]().float().clone()
        ste["rewind"]()
        _update(h, plan2)
        for _ in range(5):
            logits_after = ste["step"]().float().clone()
            ste["rewind"]()
        delta = {k: v - before[k] for k, v in _dynamo_counts().items()}
        changed = not torch.equal(logits_before, logits_after)
        ok = all(v == 0 for v in delta.values()) and changed
        return {"timing": {n: r.summary() for n, r in res.items()},
                "compile": {"vanilla": van["compile"] if vanilla is None else "reused", "steered": ste["compile"]},
                "update_dynamo_delta": delta, "update_changed_logits": changed,
                "zero_recompile": "pass" if ok else "FAIL",
                "reason": "" if ok else ("handle.update() recompiled" if any(delta.values()) else
                                         "handle.update() did not change the compiled model's logits")}
    finally:
        h.detach()


# --------------------------------------------------------------------------------------------------
# the step list
# --------------------------------------------------------------------------------------------------
def steps(cfg: GPUConfig) -> list[dict]:
    """Every step the run would take: {"name", "estimate_s", "what"} (no work done)."""
    n_par = len(GK.parity_cases()) if cfg.kernel_cases is None else min(cfg.kernel_cases, len(GK.parity_cases()))
    out = [{"name": "environment", "estimate_s": ESTIMATES["environment"],
            "what": "GPU name / capability, CUDA, torch, triton versions; peak HBM bandwidth (NVML or a copy)"},
           {"name": "kernel parity", "estimate_s": ESTIMATES["kernel parity"],
            "what": f"{n_par} cases: {', '.join(GK.PARITY_WIDTHS)} x fp32/fp16/bf16 x maps x widths "
                    f"{sorted({w for ws in GK.PARITY_WIDTHS.values() for w in ws})} x rows {GK.PARITY_ROWS}, "
                    f"kernel_mode({cfg.kernel_mode!r}) vs the torch reference"}]
    if cfg.bandwidth:
        out.append({"name": "kernel bandwidth", "estimate_s": ESTIMATES["kernel bandwidth"],
                    "what": f"{len(GK.bandwidth_cases())} cases x {GK.INNER} launches, CUDA events: GB/s, % of peak"})
    for m in cfg.models:
        out.append({"name": f"{m}: load", "estimate_s": ESTIMATES["load"],
                    "what": f"{m} in {cfg.dtype} on {cfg.device}"})
    for m in cfg.models:
        for scen, B in cfg.scenarios:
            label = f"{m}: {scen} batch {B}"
            out.append({"name": f"{label}: model parity", "estimate_s": ESTIMATES["model parity"],
                        "what": f"{cfg.backend} vs reference hooks, max |Δlogit| over a {cfg.prompt_len}-token "
                                "prefill"})
            out.append({"name": f"{label}: eager", "estimate_s": ESTIMATES["eager"],
                        "what": f"{cfg.warmup} + {cfg.cycles} paired decode steps, vanilla vs {cfg.backend}"})
    for m in cfg.models:
        for scen, B in cfg.scenarios:
            out.append({"name": f"{m}: {scen} batch {B}: CUDA graphs + zero-recompile",
                        "estimate_s": ESTIMATES["compiled"],
                        "what": f"StaticCache + torch.compile(mode={cfg.compile_mode!r}, "
                                f"backend={cfg.compile_backend!r})"
                                f" (vanilla compiled once per batch): {cfg.warmup} + {cfg.cycles} paired steps; then "
                                "handle.update(new values): 0 new graphs/frames/recompiles, logits changed"})
    out.append({"name": "write results", "estimate_s": 2, "what": "gpu-<device>.json + gpu-<device>.png"})
    return out


def dry_run(cfg: GPUConfig) -> dict:
    """Print every step; build what needs no GPU: the kernel cases and their inputs (CPU), the models (if
    available here), their plans, and every steered arm (attach + detach on a copy)."""
    log = cfg.log
    plan = steps(cfg)
    log(f"bench gpu --dry-run: {len(plan)} steps, estimated {sum(s['estimate_s'] for s in plan)} s on an H100-class "
        f"GPU (budget {cfg.budget_s:.0f} s); nothing is timed")
    for i, s in enumerate(plan, 1):
        log(f"  {i:2d}. [{s['estimate_s']:3d} s] {s['name']}: {s['what']}")
    built = {"kernel_cases": 0, "bandwidth_cases": 0, "models": {}}
    for case in GK.parity_cases()[: cfg.kernel_cases]:
        GK.make_inputs(case, "cpu")
        built["kernel_cases"] += 1
    built["bandwidth_cases"] = len(GK.bandwidth_cases())
    for name in cfg.models:
        try:
            loaded = load_model(name, "fp32" if cfg.dtype == "int8" else cfg.dtype, "cpu")
        except Exception as e:  # noqa: BLE001 - a model that cannot load here is reported, not fatal
            built["models"][name] = {"status": "not available here", "reason": f"{type(e).__name__}: {e}"[:300]}
            log(f"  {name}: not available on this machine ({type(e).__name__}); its steps would fail the same "
                "way on the GPU machine unless the wheel / cache is there")
            continue
        plans = scenario_plans(loaded.model)
        arms = []
        for scen, B in cfg.scenarios:
            p, p2 = plans[scen]
            rows = list(p) if isinstance(p, dict) else None
            for backend in (cfg.backend, "reference"):  # attach + detach (no forward: no copy needed)
                h = fs.attach(loaded.model, p, backend=backend, check_finite=False)
                if rows is not None:
                    h.route(rows)
                h.detach()
            arms.append(f"{scen} b{B}: {len(p) if isinstance(p, dict) else 1} plan(s), "
                        f"{len(next(iter(p.values())).entries) if isinstance(p, dict) else len(p.entries)} entries")
        built["models"][name] = {"status": "built", "arms": arms,
                                 "predicted_ratio": {f"b{B}/{pl}": TR.predicted_ratio(TR.ARCHS[name], B, pl)
                                                     for B, pl in ((1, 1), (8, 1), (8, 8))}
                                 if name in TR.ARCHS else None}
        log(f"  {name}: loaded on CPU, plans and {len(arms) * 2} steered arms built ({'; '.join(arms)})")
        del loaded
    log(f"  built {built['kernel_cases']} kernel parity inputs on CPU, listed {built['bandwidth_cases']} "
        "bandwidth cases")
    return {"dry_run": True, "steps": plan, "built": built}


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------
class _Budget:
    def __init__(self, seconds: float, log):
        self.t0, self.seconds, self.log, self.skipped = time.perf_counter(), seconds, log, []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def allows(self, name: str, estimate: float) -> bool:
        if self.elapsed() + estimate <= self.seconds:
            return True
        self.skipped.append(name)
        self.log(f"  skipped (time budget {self.seconds:.0f} s, {self.elapsed():.0f} s used): {name}")
        return False


def _environment(device) -> dict:
    from importlib import metadata

    env = {"torch": torch.__version__, "triton": metadata.version("triton"), "cuda": torch.version.cuda}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gb=round(p.total_memory / 2 ** 30, 1),
                   sms=p.multi_processor_count)
        peak, src = GK.peak_bandwidth()
        env.update(peak_GB_per_s=peak / 1e9, peak_source=src)
    return env


def run_gpu(cfg: GPUConfig) -> dict:
    """Run the steps (see the module docstring); returns the result and writes it when ``cfg.out`` is set."""
    log = cfg.log
    dev = torch.device(cfg.device)
    budget = _Budget(cfg.budget_s, log)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items() if k != "log"}
    result: dict = {"suite": "gpu", "config": config,
                    "environment": _environment(dev), "kernel_parity": None, "kernel_bandwidth": None, "models": {}}
    env = result["environment"]
    log(f"bench gpu on {env.get('gpu', dev)} (capability {env.get('capability', '–')}), torch {env['torch']}, "
        f"triton {env['triton']}, CUDA {env['cuda']}; budget {cfg.budget_s:.0f} s")
    if budget.allows("kernel parity", ESTIMATES["kernel parity"]):
        cases = GK.parity_cases()[: cfg.kernel_cases]
        recs = GK.run_parity(cases, dev, mode=cfg.kernel_mode, progress=cfg.progress)
        bad = [r for r in recs if not r["ok"]]
        result["kernel_parity"] = {"cases": len(recs), "failed": len(bad), "records": recs}
        log(f"kernel parity ({cfg.kernel_mode} vs torch reference on {dev}): {len(recs) - len(bad)}/{len(recs)} pass")
        for r in bad[:10]:
            log(f"  FAIL {r['kernel']} {r['family'] or ''} {r['dtype']} map={r['map']} W={r['width']} M={r['rows']}: "
                f"{r.get('error') or {k: r[k] for k in ('s', 'normed', 'out') if k in r}}")
    if cfg.bandwidth and dev.type == "cuda" and budget.allows("kernel bandwidth", ESTIMATES["kernel bandwidth"]):
        bw = GK.run_bandwidth(GK.bandwidth_cases(), dev, progress=cfg.progress)
        result["kernel_bandwidth"] = bw
        for r in bw["cases"]:
            if r["rows"] == 4096 and "GB_per_s" in r:
                log(f"  {r['kernel']:11s} {r['dtype']} {r['map']:7s} {r['rows']}x{r['width']}: "
                    f"{r['us_per_call']:8.1f} µs "
                    f"{r['GB_per_s']:7.0f} GB/s = {100 * r['frac_peak']:.0f}% of peak ({bw['peak_source'].split()[0]})")
    elif cfg.bandwidth and dev.type != "cuda":
        result["kernel_bandwidth"] = {"skipped": "needs CUDA events on a GPU"}
    loaded_models: dict = {}
    for name in cfg.models:
        if not budget.allows(f"{name}: load", ESTIMATES["load"]):
            continue
        entry: dict = {"scenarios": []}
        result["models"][name] = entry
        try:
            loaded = load_model(name, cfg.dtype, dev)
        except Exception as e:  # noqa: BLE001 - reported, the other model still runs
            entry["error"] = f"{type(e).__name__}: {e}"[:500]
            log(f"{name}: cannot load: {entry['error']}")
            continue
        arch = TR.ARCHS.get(name)
        plans = scenario_plans(loaded.model)
        work = []
        for scen, B in cfg.scenarios:
            p, p2 = plans[scen]
            rows = list(p) if isinstance(p, dict) else None
            sc = {"scenario": scen, "batch": B, "plans": len(p) if rows else 1,
                  "predicted_ratio": TR.predicted_ratio(arch, B, len(p) if rows else 1) if arch else None}
            entry["scenarios"].append(sc)
            work.append((sc, p, p2, rows, C.prompt_ids(loaded, B, cfg.prompt_len, dev)))
        loaded_models[name] = (loaded, work)

    def attempt(label, part, sc, fn):
        if not budget.allows(f"{label}: {part}", ESTIMATES[part]):
            sc[part] = {"skipped": "time budget"}
            return
        try:
            sc[part] = fn()
        except Exception as e:  # noqa: BLE001 - reported per step
            sc[part] = {"error": f"{type(e).__name__}: {e}"[:500]}
        log(_fmt(label, part, sc[part]))

    # parity and eager timing for every model first, then the (slow to compile) CUDA-graph steps
    for name, (loaded, work) in loaded_models.items():
        for sc, p, p2, rows, ids in work:
            label = f"{name} {sc['scenario']} b{sc['batch']}"
            attempt(label, "model parity", sc, lambda: model_parity(loaded, p, rows, ids, cfg.backend))
            attempt(label, "eager", sc, lambda: eager_ratio(loaded.model, p, rows, ids, cfg.backend, cfg.cycles,
                                                             cfg.warmup, cfg.progress))
    for name, (loaded, work) in loaded_models.items():
        vanillas: dict = {}
        for sc, p, p2, rows, ids in work:
            label = f"{name} {sc['scenario']} b{sc['batch']}"

            def compiled():
                B = sc["batch"]
                if B not in vanillas:
                    vanillas[B] = compiled_step(loaded.model, ids, cfg.compile_mode, cfg.compile_backend)
                r = compiled_ratio(loaded.model, p, p2, rows, ids, cfg.backend, cfg.compile_mode, cfg.compile_backend,
                                   cfg.cycles, cfg.warmup, cfg.progress, vanilla=vanillas[B])
                r["compile"]["vanilla"] = vanillas[B]["compile"]
                return r
            attempt(label, "compiled", sc, compiled)
        vanillas.clear()
    loaded_models.clear()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    result["skipped"] = budget.skipped
    result["seconds"] = round(budget.elapsed(), 1)
    result["ok"] = _ok(result)
    if cfg.out is not None:
        write(result, Path(cfg.out), env.get("gpu") or f"{dev.type}-smoke")
    return result


def _fmt(label: str, part: str, r: dict) -> str:
    if "error" in r:
        return f"  {label} {part}: ERROR {r['error']}"
    if part == "model parity":
        return (f"  {label} parity: max |Δlogit| {r['max_abs']:.3g} <= {r['tolerance']:.3g} "
                f"(plan moves logits by {r['plan_effect']:.3g}): {'pass' if r['ok'] else 'FAIL'}")
    t = r["timing"] if part == "compiled" else r
    s = t["steered"]
    extra = (f"; update(): {r['update_dynamo_delta']} -> {r['zero_recompile']}" if part == "compiled" else "")
    return (f"  {label} {part}: vanilla {t['vanilla']['median_ms']:.3f} ms, steered/vanilla "
            f"{s.get('ratio_median', float('nan')):.3f} [{s.get('ratio_ci_low', float('nan')):.3f}, "
            f"{s.get('ratio_ci_high', float('nan')):.3f}]{extra}")


def _ok(result: dict) -> bool:
    kp = result.get("kernel_parity")
    if kp is None or kp["failed"]:
        return False
    for entry in result["models"].values():
        if "error" in entry:
            return False
        for sc in entry["scenarios"]:
            mp = sc.get("model parity", {})
            if "skipped" not in mp and not mp.get("ok", False):
                return False
            if sc.get("compiled", {}).get("zero_recompile") not in (None, "pass") or "error" in sc.get("compiled", {}):
                return False
            if "error" in sc.get("eager", {}):
                return False
    return True


def write(result: dict, out: Path, device_name: str) -> tuple[Path, Path | None]:
    import json

    from .report import _clean, plots_unavailable

    out.mkdir(parents=True, exist_ok=True)
    tag = device_tag(device_name)
    jpath = out / f"gpu-{tag}.json"
    machine = C.machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    tmp = jpath.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean({"machine": machine, "result": result}), indent=1, allow_nan=False))
    tmp.replace(jpath)
    if plots_unavailable():  # matplotlib is an extra: the JSON is the result, the PNG a view of it
        return jpath, None
    return jpath, plot(result, out / f"gpu-{tag}.png")


def plot(result: dict, path: Path) -> Path | None:
    from .report import _plt

    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2))
    bw = result.get("kernel_bandwidth") or {}
    cases = [c for c in bw.get("cases", []) if c.get("rows") == 4096 and "frac_peak" in c]
    ax1.bar(range(len(cases)), [100 * c["frac_peak"] for c in cases], color="#4C72B0")
    ax1.set_xticks(range(len(cases)))
    ax1.set_xticklabels([f"{c['kernel']}\n{c['dtype']} {c['map']}\nW={c['width']}" for c in cases], fontsize=6)
    ax1.set_ylabel("% of peak HBM bandwidth")
    ax1.set_title("kernels, 4096 rows" if cases else "kernels: no bandwidth measured", fontsize=10)
    labels, xs = [], 0
    for name, entry in result.get("models", {}).items():
        for sc in entry.get("scenarios", []):
            for k, (part, color) in enumerate((("eager", "#DD8452"), ("compiled", "#55A868"))):
                r = sc.get(part) or {}
                t = r.get("timing", r) if part == "compiled" else r
                s = (t or {}).get("steered") or {}
                if "ratio_median" in s:
                    ax2.bar(xs + (k - 0.5) * 0.38, s["ratio_median"], width=0.36, color=color,
                            yerr=[[s["ratio_median"] - s["ratio_ci_low"]], [s["ratio_ci_high"] - s["ratio_median"]]],
                            capsize=3, label=part if not labels else None)
            if sc.get("predicted_ratio"):
                ax2.plot([xs - 0.4, xs + 0.4], [sc["predicted_ratio"]] * 2, color="black", lw=1, ls=":")
            labels.append(f"{name}\n{sc['scenario']} b{sc['batch']}")
            xs += 1
    ax2.axhline(1.0, color="black", lw=0.8)
    ax2.set_xticks(range(len(labels)))
    ax2.set_xticklabels(labels, fontsize=7)
    ax2.set_ylabel("steered / vanilla decode step")
    ax2.set_title("eager vs CUDA graphs (dotted: roofline prediction)", fontsize=10)
    if labels:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def cli(args) -> int:
    """`fusesteer bench gpu [--dry-run]` (``args`` parsed with :func:`fusesteer.bench.options.add_gpu_arguments`)."""
    if args.budget <= 0:
        raise C.BenchError(f"--budget must be positive, got {args.budget}")
    if args.cycles < 5 or args.warmup < 0:
        raise C.BenchError(f"--cycles must be >= 5 and --warmup >= 0, got {args.cycles} and {args.warmup}")
    try:
        kind = torch.device(args.device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind != "cuda":
        raise C.BenchError(f"--device {args.device!r}: bench gpu runs on a CUDA device (cuda or cuda:N)")
    out = resolve_out(args.out, create=False)
    cfg = GPUConfig(device=args.device, cycles=args.cycles, warmup=args.warmup, budget_s=float(args.budget),
                    dry_run=args.dry_run, progress=not args.no_progress, out=out)
    if args.dry_run:
        dry_run(cfg)
        return 0
    if not torch.cuda.is_available():
        raise C.BenchError("bench gpu needs a CUDA device (none is visible here); `fusesteer bench gpu --dry-run` "
                           "lists and builds every step on any machine")
    resolve_out(out)  # created (or refused) now, not after minutes of GPU time
    r = run_gpu(cfg)
    print(f"bench gpu: {'PASS' if r['ok'] else 'FAIL'} in {r['seconds']} s"
          f"{'; skipped for time: ' + ', '.join(r['skipped']) if r['skipped'] else ''}; results in {out}")
    return 0 if r["ok"] else 1
