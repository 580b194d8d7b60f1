"""Latency suite: prefill and decode time of every arm against vanilla, on the same plan, interleaved.

Scenarios (same model, same prompt batch, arms interleaved step by step in a fresh random order each cycle,
warm-up cycles first, ratios paired within a cycle; see :mod:`fusesteer.timing`):

* ``blend+gains`` (batch 1 and 8): an all-layer ``layer.out`` blend (a = 1, b = α·γ·Δ_l-like random vector per
  layer) plus k = 100 gains on ``attn.o_proj.in`` and k = 100 on ``mlp.down_proj.in`` units (chosen at random
  over all layers, AUSteer-style). Arms: vanilla, ``reference`` hooks, ``torch``, ``triton`` (CUDA only),
  ``fold``, ``auto``.
* ``additive`` (batch 1 and 8): additive-only all-layer ``layer.out`` vectors, the plan the peers can express.
  Arms: vanilla, a bare torch forward hook per layer, steering-vectors, repeng, ``reference``, ``torch``,
  ``triton`` (CUDA only), ``auto``.
* ``per-row`` (batch 8): 8 different blend+gains plans, one per row (``handle.route``). Arms: vanilla,
  ``reference``, ``torch``, ``triton`` (CUDA only), ``auto`` (which cannot fold per-row plans: fully fused).

Every arm is smoke-tested (one untimed forward under ``torch.inference_mode()``) before timing; an arm that
fails is reported with its error and left out, never timed. On CUDA the steps are timed with CUDA events, and
:func:`compile_check` adds a static-cache + ``torch.compile`` mode and checks that ``handle.update()`` with new
values causes zero recompiles. Without CUDA those parts are reported as skipped: no GPU number is invented.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

import fusesteer as fs
from fusesteer.runtime.backends import resolve
from fusesteer.runtime.compat import output_cache, with_cache
from fusesteer.timing import (
    ArmResult,
    crop_cache,
    paired_decode_steps,
    paired_prefill_steps,
    paired_ratios,
    paired_steps,
    ratio_summary,
)

from . import common as C

TARGETS = {
    "fused": 1.02,  # fused / vanilla, blend+gains
    "folded": 1.005,  # fold / vanilla, blend+gains
    "fused_vs_peer": 0.95,  # fused / peer, additive
    "per_row": 1.05,  # fused / vanilla, 8 per-row plans at batch 8
}
CUDA_SKIP_NOTE = ("no CUDA device here: CUDA-event timing and CUDA graphs were NOT run, nor (without --compiled) "
                  "the static-cache + torch.compile arm; run `fusesteer bench latency --compiled` for inductor "
                  "on CPU, or `--device cuda` on a GPU machine")


@dataclass
class LatencyConfig:
    quick: bool = True
    model: str = "smollm2-135m"
    device: str = "cpu"
    cycles: int | None = None  # decode cycles
    prefill_cycles: int | None = None
    warmup: int | None = None
    prompt_len: int | None = None
    batches: tuple = (1, 8)
    k: int = 100
    seed: int = 0
    scenarios: tuple = ("blend+gains", "additive", "per-row")
    arms: tuple = ("reference", "torch", "triton", "fold", "auto", "hook", "steering-vectors", "repeng")
    phases: tuple = ("decode", "prefill")
    protocol: str = "attach"  # "attach": one model, each arm set up/torn down around its step; "copies"
    check_finite: bool = False  # attach(check_finite=...) for our arms: the check is a one-time first-forward
    # cost, which the attach protocol would otherwise pay on every timed step (see the report)
    aa_control: bool = True  # add "vanilla-2", a second unmodified arm: its ratio shows the noise/bias floor
    progress: bool = False
    log: object = print
    checkpoint: object = None  # called with the partial result after every scenario (long runs)
    compiled: bool = False  # also time static-cache torch.compile decode steps on CPU (inductor; minutes)


def _arms_for(cfg: LatencyConfig, model, scenario: str, plans: dict, device) -> tuple[dict, list]:
    """(arms {name: factory}, notes [{arm, status, reason}]) of one scenario."""
    arms: dict = {"vanilla": None}
    if cfg.aa_control:
        arms["vanilla-2"] = None
    notes: list = []
    want = [a for a in cfg.arms]

    def ours(names, plan, rows=None):
        for b in names:
            if b not in want:
                continue
            if b == "triton" and device.type != "cuda":
                notes.append({"arm": b, "status": "skipped", "reason": "Triton kernels on CPU run only in the "
                              "interpreter (~1000x slower): not a speed measure; timed on CUDA only"})
                continue
            arms[b] = C.fusesteer_arm(model, plan, b, rows, check_finite=cfg.check_finite)

    if scenario == "blend+gains":
        ours(("reference", "torch", "triton", "fold", "auto"), plans["blend+gains"])
    elif scenario == "additive":
        vecs = C.plan_vectors(plans["additive"])
        if "hook" in want:
            arms["hook"] = C.hook_arm(model, vecs)
        for p in C.PEERS:
            if p not in want:
                continue
            ok, why = C.peer_available(p)
            if ok:
                arms[p] = C.peer_arm(p, model, vecs)
            else:
                notes.append({"arm": p, "status": "skipped", "reason": why})
        ours(("reference", "torch", "triton", "auto"), plans["additive"])
    elif scenario == "per-row":
        rows = list(plans["per-row"])
        ours(("reference", "torch", "triton", "auto"), plans["per-row"], rows)
    else:
        raise C.BenchError(f"unknown latency scenario {scenario!r}")
    return arms, notes


class _Copies:
    """The "copies" protocol: every arm, vanilla included, runs on its own deep copy of the loaded model, with
    the arm applied once and left in place, and its own KV cache. The interleaved steps then involve no set-up
    or tear-down (no re-folding, no hook registration, no allocator churn right before a timed step). The
    loaded model is only the template: its weights may live in differently backed memory (e.g. mapped from the
    safetensors file rather than anonymous pages), which showed as a systematic ~3% speed difference against
    fresh copies. Costs one model copy per arm in memory."""

    def __init__(self, cfg, model, scenario, plans, device, names):
        import contextlib

        self.stack = contextlib.ExitStack()
        self.models = {}
        for name in names:
            m = copy.deepcopy(model)  # vanilla too: every arm's weights are fresh copies made the same way
            self.models[name] = m
            if name in ("vanilla", "vanilla-2"):
                continue
            arms, _ = _arms_for(cfg, m, scenario, plans, device)
            self.stack.enter_context(arms[name]())

    def time(self, phase, ids, cycles, warmup):
        B, T = ids.shape
        dev = ids.device
        arms = {n: None for n in self.models}
        steps, caches = {}, []
        with torch.inference_mode():
            for n, m in self.models.items():
                if phase == "prefill":
                    pos = torch.arange(T, device=dev).expand(B, T)
                    steps[n] = (lambda m=m, pos=pos: m(input_ids=ids, position_ids=pos, use_cache=True))
                    continue
                out = m(input_ids=ids, position_ids=torch.arange(T, device=dev).expand(B, T), use_cache=True)
                cache = output_cache(out)
                caches.append(cache)
                nxt = out.logits[:, -1:].argmax(-1)
                pos = torch.full_like(nxt, T)
                steps[n] = (lambda m=m, nxt=nxt, pos=pos, cache=cache:
                            m(input_ids=nxt, position_ids=pos, use_cache=True, **with_cache(m, cache)))

        def run(fn):
            def step():
                with torch.inference_mode():
                    fn()
            return step

        def crop():
            for c in caches:
                crop_cache(c, T)

        return paired_steps({n: run(f) for n, f in steps.items()}, arms, cycles=cycles, warmup=warmup,
                            device=dev, after_step=crop if caches else None, desc=f"{phase} (copies)")

    def close(self):
        self.stack.close()
        self.models.clear()


def _smoke(model, ids, factory) -> str | None:
    """One untimed 2-token forward under the arm (inference_mode, as the timing): None or the error."""
    B = ids.shape[0]
    try:
        with torch.inference_mode(), factory():
            model(input_ids=ids[:, :2], position_ids=torch.arange(2, device=ids.device).expand(B, 2))
    except Exception as e:  # noqa: BLE001 - reported, the arm is left out
        return f"{type(e).__name__}: {e}"[:400]
    return None


def _summaries(res: dict[str, ArmResult], seed: int) -> dict:
    return {n: r.summary(seed=seed) for n, r in res.items()}


def _cross(res: dict[str, ArmResult], pairs) -> dict:
    out = {}
    for num, den in pairs:
        if num in res and den in res:
            out[f"{num}/{den}"] = ratio_summary(paired_ratios(res, num, den))
    return out


def run_latency(cfg: LatencyConfig) -> dict:
    device = torch.device(cfg.device)
    cycles = cfg.cycles or (6 if cfg.quick else 300)
    pcycles = cfg.prefill_cycles or (5 if cfg.quick else 60)
    warmup = cfg.warmup if cfg.warmup is not None else (1 if cfg.quick else 10)
    T = cfg.prompt_len or (16 if cfg.quick else 32)
    log = cfg.log
    t_start = time.perf_counter()
    load_before = C.load_average()
    if cfg.quick:
        loaded = C.tiny_model("llama", "fp32")
        loaded.model.to(device)
    else:
        loaded = C.real_model(cfg.model, "fp32", device)
    model = loaded.model
    fused = resolve("auto", model, per_row=True)  # the fused backend auto runs on this model (the one rule)
    plans = {
        "blend+gains": C.blend_gains_plan(model, seed=cfg.seed, k=cfg.k),
        "additive": C.additive_plan(model, seed=cfg.seed),
        "per-row": C.per_row_plans(model, 8, seed=cfg.seed, k=cfg.k),
    }
    out_scen: list = []
    for scenario in cfg.scenarios:
        batches = (8,) if scenario == "per-row" else cfg.batches
        for B in batches:
            ids = C.prompt_ids(loaded, B, T, C.model_device(model), seed=cfg.seed)
            arms, notes = _arms_for(cfg, model, scenario, plans, device)
            for name in list(arms):
                if arms[name] is None:
                    continue
                err = _smoke(model, ids, arms[name])
                if err is not None:
                    notes.append({"arm": name, "status": "ERROR", "reason": err})
                    log(f"  {scenario} batch {B}: arm {name} left out: {err}")
                    del arms[name]
            entry = {"scenario": scenario, "batch": B, "prompt_len": T, "arms": list(arms), "notes": notes,
                     "load_average_at_start": C.load_average(), "phases": {}}
            copies = _Copies(cfg, model, scenario, plans, device, list(arms)) if cfg.protocol == "copies" else None
            for phase in cfg.phases:
                t0 = time.perf_counter()
                if copies is not None:
                    n_c = cycles if phase == "decode" else pcycles
                    res = copies.time(phase, ids, n_c, warmup if phase == "decode" else max(1, warmup // 3))
                elif phase == "decode":
                    res = paired_decode_steps(model, ids, arms, cycles=cycles, warmup=warmup, position_ids=True,
                                              progress=cfg.progress)
                    n_c = cycles
                else:
                    res = paired_prefill_steps(model, ids, arms, cycles=pcycles, warmup=max(1, warmup // 3),
                                               position_ids=True, progress=cfg.progress)
                    n_c = pcycles
                summ = _summaries(res, cfg.seed)
                pairs = []
                if scenario == "additive":
                    for ours in (fused, "auto", "reference", "hook"):
                        for peer in C.PEERS + ("hook",):
                            if ours != peer:
                                pairs.append((ours, peer))
                pairs += [(fused, "reference")]
                entry["phases"][phase] = {"cycles": n_c, "arms": summ, "cross": _cross(res, pairs),
                                          "seconds": round(time.perf_counter() - t0, 1)}
                log(_fmt_phase(scenario, B, phase, summ, n_c))
            if copies is not None:
                copies.close()
            out_scen.append(entry)
            if cfg.checkpoint is not None:
                cfg.checkpoint({"suite": "latency", "partial": True, "model": loaded.label, "scenarios": out_scen})
    result = {
        "suite": "latency",
        "mode": "quick" if cfg.quick else "full",
        "model": loaded.label,
        "dtype": "fp32",
        "fused_backend": fused,
        "plans": _plan_info(plans, model),
        "config": {"decode_cycles": cycles, "prefill_cycles": pcycles, "warmup": warmup, "prompt_len": T,
                   "batches": list(cfg.batches), "k": cfg.k, "seed": cfg.seed, "timer":
                   "CUDA events" if device.type == "cuda" else "time.perf_counter",
                   "torch_threads": torch.get_num_threads(), "protocol": cfg.protocol,
                   "check_finite": cfg.check_finite, "aa_control": cfg.aa_control},
        "load_average_before": load_before,
        "scenarios": out_scen,
        "peers": C.peer_versions(),
    }
    result["targets"] = evaluate_targets(result, quick=cfg.quick)
    if device.type == "cuda" or cfg.compiled:
        mode = "reduce-overhead" if device.type == "cuda" else None
        runs = []
        for B in cfg.batches:
            try:
                runs.append(compile_check(model, plans["blend+gains"],
                                          C.blend_gains_plan(model, seed=cfg.seed + 1, k=cfg.k),
                                          C.prompt_ids(loaded, B, T, device, seed=cfg.seed),
                                          backend=fused, mode=mode, cycles=cycles, warmup=warmup, log=log))
            except Exception as e:  # noqa: BLE001 - reported in the JSON, never replaced by a number
                runs.append({"status": "ERROR", "batch": B, "reason": f"{type(e).__name__}: {e}"[:500]})
        result["compiled"] = runs
    else:
        result["compiled"] = [{"status": "skipped", "reason": CUDA_SKIP_NOTE}]
        log(f"  note: {CUDA_SKIP_NOTE}")
    result["load_average_after"] = C.load_average()
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    return result


def _plan_info(plans, model) -> dict:
    def one(p):
        return {"entries": len(p.entries), "sites": sorted({e.site for e in p.entries}),
                "layers": len({e.layer for e in p.entries})}
    return {"blend+gains": one(plans["blend+gains"]), "additive": one(plans["additive"]),
            "per-row": {"plans": len(plans["per-row"]), **one(next(iter(plans["per-row"].values())))}}


def _fmt_phase(scenario, B, phase, summ, n) -> str:
    van = summ["vanilla"]["median_ms"]
    parts = [f"{a} {s['ratio_median']:.3f}" for a, s in summ.items() if a != "vanilla"]
    return f"  {scenario:11s} b{B} {phase:7s} vanilla {van:7.2f} ms  ({n} cycles)  " + ", ".join(parts)


# --------------------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------------------
def evaluate_targets(result: dict, quick: bool) -> list[dict]:
    """One record per (target, scenario, batch, phase): the measured median ratio, its CI and whether the
    target is met. ``quick`` results are on a tiny model and say nothing about the targets."""
    fused = result["fused_backend"]
    out = []

    def add(target, label, scenario, batch, phase, summ):
        if not summ or "ratio_median" not in summ:
            return
        lim = TARGETS[target]
        out.append({"target": target, "what": label, "limit": lim, "scenario": scenario, "batch": batch,
                    "phase": phase, "median": summ["ratio_median"], "ci": [summ["ratio_ci_low"],
                                                                             summ["ratio_ci_high"]],
                    "met": summ["ratio_median"] <= lim,
                    "meaningful": not quick})

    for sc in result["scenarios"]:
        for phase, ph in sc["phases"].items():
            arms, cross = ph["arms"], ph["cross"]
            if sc["scenario"] == "blend+gains":
                add("fused", f"{fused} / vanilla", sc["scenario"], sc["batch"], phase, arms.get(fused))
                add("folded", "fold / vanilla", sc["scenario"], sc["batch"], phase, arms.get("fold"))
            elif sc["scenario"] == "additive":
                for peer in C.PEERS:
                    add("fused_vs_peer", f"{fused} / {peer}", sc["scenario"], sc["batch"], phase,
                        cross.get(f"{fused}/{peer}"))
            elif sc["scenario"] == "per-row":
                add("per_row", f"{fused} / vanilla (8 per-row plans)", sc["scenario"], sc["batch"], phase,
                    arms.get(fused))
    return out


# --------------------------------------------------------------------------------------------------
# CUDA: static cache + torch.compile, zero recompiles on handle.update()
# --------------------------------------------------------------------------------------------------
def _dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "frames_ok": int(counters["frames"]["ok"]),
            "frames_total": int(counters["frames"]["total"]),
            "recompiles": int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0}


def rewind_static_cache(cache, length: int) -> None:
    """Put a StaticCache's write position back to ``length``, on every transformers 5.x: newer releases keep it in
    an in-place ``cumulative_length`` tensor per layer; older ones derive the next position from the number of
    occupied (non-zero) key slots, so the slots from ``length`` on are cleared too."""
    for layer in getattr(cache, "layers", ()):
        n = getattr(layer, "cumulative_length", None)
        if isinstance(n, torch.Tensor):
            n.fill_(length)
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.dim() == 4:
                t[:, :, length:].zero_()


def compile_check(model, plan, plan2, ids: torch.Tensor, backend: str = "triton", mode: str | None = "reduce-overhead",
                  cycles: int = 100, warmup: int = 5, steps_after_update: int = 5, log=print) -> dict:
    """Static KV cache + ``torch.compile(fullgraph=True)`` decode steps, three arms interleaved: compiled
    vanilla, compiled steered (a deep copy with ``plan`` attached) and eager vanilla. Then
    ``handle.update(plan2)`` (same sites, new values) must cause zero new graphs/frames and change the logits.

    On CUDA ``mode="reduce-overhead"`` adds CUDA graphs; on CPU inductor's default mode compiles C++ kernels.
    Reports compiled steered / compiled vanilla and compiled vanilla / eager vanilla (median of paired ratios).
    """
    from transformers import StaticCache

    dev = ids.device
    B, T = ids.shape
    steered = copy.deepcopy(model)
    # plan2 may act at other (layer, site) pairs: patch those up front, so update() only writes values
    handle = fs.attach(steered, plan, backend=backend, sites=sorted({(e.layer, e.site) for e in plan2.entries}))
    try:
        fns, caches = {}, []
        graphs = {}

        def rewind():  # outside the timed calls: the next step writes the same cache slot again
            for c in caches:
                rewind_static_cache(c, T)

        for name, m, compiled in (("vanilla", model, True), ("steered", steered, True),
                                  ("vanilla-eager", model, False)):
            cache = StaticCache(config=m.config, max_cache_len=T + 8)
            caches.append(cache)
            with torch.no_grad():
                o = m(input_ids=ids, position_ids=torch.arange(T, device=dev).expand(B, T), use_cache=True,
                      **with_cache(m, cache))
            nxt = o.logits[:, -1:].argmax(-1)
            pos = torch.full((B, 1), T, device=dev)
            fwd = torch.compile(m.forward, mode=mode, fullgraph=True, dynamic=False) if compiled else m.forward

            def step(fwd=fwd, nxt=nxt, pos=pos, cache=cache, m=m):
                with torch.no_grad():
                    return fwd(input_ids=nxt, position_ids=pos, use_cache=True, **with_cache(m, cache)).logits
            fns[name] = step
            c0 = _dynamo_counts()
            for _ in range(3):  # compile + (CUDA graphs) record
                fns[name]()
                rewind()
            c1 = _dynamo_counts()
            graphs[name] = {k: c1[k] - c0[k] for k in c1}
        before = _dynamo_counts()
        logits_before = fns["steered"]().float().clone()
        rewind()
        handle.update(plan2)
        for _ in range(steps_after_update):
            logits_after = fns["steered"]().float().clone()
            rewind()
        after = _dynamo_counts()
        delta = {k: after[k] - before[k] for k in before}
        changed = not torch.equal(logits_before, logits_after)
        handle.update(plan)
        res = paired_steps(fns, {"vanilla": None, "steered": None, "vanilla-eager": None}, cycles=cycles,
                           warmup=warmup, device=dev, after_step=rewind, desc="compiled decode steps")
        timing = {n: r.summary() for n, r in res.items()}
        eager_ratio = ratio_summary(paired_ratios(res, "vanilla", "vanilla-eager"))
        ok = all(v == 0 for v in delta.values()) and changed
        out = {"status": "pass" if ok else "FAIL", "backend": backend, "mode": mode or "default", "batch": B,
               "compile_counts": graphs, "dynamo_counts_before_update": before,
               "dynamo_counts_delta_after_update": delta,
               "update_changed_logits": changed, "timing": timing,
               "compiled_vs_eager_vanilla": eager_ratio,
               "reason": "" if ok else ("handle.update() recompiled" if any(delta.values()) else
                                        "handle.update() did not change the compiled model's logits")}
        log(f"  compiled ({mode or 'default'}, {backend}, batch {B}): steered/vanilla "
            f"{timing['steered'].get('ratio_median', float('nan')):.3f}, compiled/eager vanilla "
            f"{eager_ratio.get('ratio_median', float('nan')):.3f}; update(): new graphs {delta['unique_graphs']}, "
            f"recompiles {delta['recompiles']}, logits changed {changed} -> {out['status']}")
        return out
    finally:
        handle.detach()
