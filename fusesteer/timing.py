"""Side-by-side step timing.

Whole-generate timings wander ±10-15% on shared VMs. Instead: prefill once, then time one decode step at a
time on a fixed KV cache (cropped back after each step), interleave the arms step by step (A B C A B C ...),
and report the median of paired ratios arm/vanilla with a bootstrap confidence interval.

:func:`paired_decode_steps` times cached decode steps, :func:`paired_prefill_steps` whole prefills (a fresh
cache each time); both share :func:`paired_steps`, which runs any zero-argument step function. On CUDA the
step is timed with CUDA events, elsewhere with ``time.perf_counter``. Python's garbage collector is paused
inside the timed loop and run between cycles every ``gc_every`` cycles, so a collection never lands inside a
timed step.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from .runtime.compat import output_cache, with_cache


@dataclass
class ArmResult:
    name: str
    times_ms: list[float] = field(default_factory=list)  # one per cycle, aligned across arms
    ratios: list[float] = field(default_factory=list)  # times_ms[i] / baseline.times_ms[i]

    def summary(self, seed: int = 0) -> dict:
        med = statistics.median(self.times_ms) if self.times_ms else float("nan")
        out = {"arm": self.name, "median_ms": med, "n": len(self.times_ms)}
        if self.times_ms:
            out.update(min_ms=min(self.times_ms), max_ms=max(self.times_ms))
        if self.ratios:
            out.update(ratio_summary(self.ratios, seed=seed))
        return out


def bootstrap_median_ci(values, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    n = len(values)
    meds = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(n_boot))
    return meds[int(alpha / 2 * n_boot)], meds[int((1 - alpha / 2) * n_boot) - 1]


def median_ratio_ci(num_ms, den_ms, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """median(num) / median(den) over paired cycles, with a bootstrap 95% CI that resamples whole cycles.

    Unlike the median of per-cycle ratios, this is the ratio of the two medians one prints next to it, so the
    three numbers always agree."""
    num_ms, den_ms = list(num_ms), list(den_ms)
    if not num_ms or len(num_ms) != len(den_ms):
        raise ValueError("need two equally long, non-empty lists of paired step times")
    rng = random.Random(seed)
    idx = range(len(num_ms))
    boots = []
    for _ in range(n_boot):
        pick = rng.choices(idx, k=len(num_ms))
        boots.append(statistics.median(num_ms[i] for i in pick) / statistics.median(den_ms[i] for i in pick))
    boots.sort()
    return {"num_ms": statistics.median(num_ms), "den_ms": statistics.median(den_ms),
            "ratio": statistics.median(num_ms) / statistics.median(den_ms),
            "ci_low": boots[int(alpha / 2 * n_boot)], "ci_high": boots[int((1 - alpha / 2) * n_boot) - 1]}


def ratio_summary(ratios, seed: int = 0) -> dict:
    """Median, bootstrap 95% CI of the median, min and max of a list of paired ratios."""
    ratios = list(ratios)
    if not ratios:
        return {}
    lo, hi = bootstrap_median_ci(ratios, seed=seed)
    return {"ratio_median": statistics.median(ratios), "ratio_ci_low": lo, "ratio_ci_high": hi,
            "ratio_min": min(ratios), "ratio_max": max(ratios)}


def paired_ratios(results: dict[str, ArmResult], num: str, den: str) -> list[float]:
    """Per-cycle ratios time(num) / time(den) of two arms timed in the same cycles."""
    a, b = results[num].times_ms, results[den].times_ms
    if len(a) != len(b):
        raise ValueError(f"arms {num!r} and {den!r} were not timed in the same cycles")
    return [x / y for x, y in zip(a, b)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_ms(step: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        step()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def crop_cache(cache, length: int) -> None:
    """Crop a KV cache back to ``length`` tokens (transformers 4.x and 5.x: a negative count removes tokens)."""
    extra = int(cache.get_seq_length()) - int(length)
    if extra > 0:
        cache.crop(-extra)


def paired_steps(step: Callable[[], object] | dict[str, Callable[[], object]],
                 arms: dict[str, Callable[[], object] | None], cycles: int = 100,
                 warmup: int = 5, device=None, baseline: str = "vanilla",
                 after_step: Callable[[], object] | None = None,
                 progress: bool = False, desc: str = "timing steps", gc_every: int = 25,
                 seed: int = 0) -> dict[str, ArmResult]:
    """Time ``step()`` once per arm per cycle, the arms in a fresh shuffled order every cycle.

    ``arms``: name -> zero-arg callable returning a context manager that sets the arm up (or None for an
    unmodified model). Set-up, tear-down and ``after_step()`` (e.g. cropping a cache) are outside the timing.
    ``step`` may also be a dict giving each arm its own step function (e.g. separately compiled models).
    """
    from tqdm.auto import tqdm

    names = list(arms)
    steps = step if isinstance(step, dict) else {n: step for n in names}
    missing = [n for n in names if n not in steps]
    if missing:
        raise ValueError(f"no step function for arms {missing}")
    if baseline not in names:
        raise ValueError(f"baseline arm {baseline!r} missing from arms {names}")
    if cycles < 1 or warmup < 0:
        raise ValueError(f"need cycles >= 1 and warmup >= 0, got cycles={cycles}, warmup={warmup}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    results = {n: ArmResult(n) for n in names}
    rng = random.Random(seed)
    it = range(warmup + cycles)
    if progress:
        it = tqdm(it, desc=desc, leave=False)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for c in it:
            order = names[:]
            rng.shuffle(order)
            cyc = {}
            for n in order:
                factory = arms[n]
                ctx = factory() if factory is not None else None
                with (ctx if ctx is not None else nullcontext()):
                    _sync(device)
                    cyc[n] = _timed_ms(steps[n], device)
                if after_step is not None:
                    after_step()
            if c >= warmup:
                for n in names:
                    results[n].times_ms.append(cyc[n])
                    if n != baseline:
                        results[n].ratios.append(cyc[n] / cyc[baseline])
            if gc_every and (c + 1) % gc_every == 0:
                gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()
    return results


def paired_decode_steps(model, input_ids: torch.Tensor, arms: dict[str, Callable[[], object]],
                        cycles: int = 100, warmup: int = 5, attention_mask=None, progress: bool = False,
                        baseline: str = "vanilla", forward_kwargs: dict | None = None,
                        position_ids: bool = False) -> dict[str, ArmResult]:
    """Time one cached decode step per arm per cycle, arms interleaved in a shuffled order each cycle.

    ``arms``: name -> zero-arg callable returning a context manager that sets the arm up (e.g.
    ``lambda: fs.attach(model, plan, backend="torch")``) or None for vanilla. Set-up is outside the timing.
    The prompt is prefilled once (unsteered); every step feeds the same next token on the same cache, which
    is cropped back after the step. ``position_ids=True`` passes explicit ``[B, 1]`` position ids (needed by
    peers that read them, e.g. repeng at batch > 1); ``forward_kwargs`` go to every step's forward.
    """
    device = input_ids.device
    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
    cache = output_cache(out)
    base_len = int(cache.get_seq_length())
    nxt = out.logits[:, -1:].argmax(-1)
    kw = dict(forward_kwargs or {})
    if attention_mask is not None:
        kw["attention_mask"] = torch.cat([attention_mask, torch.ones_like(nxt)], dim=1)
    if position_ids:
        if attention_mask is not None:
            pos = attention_mask.long().sum(-1, keepdim=True)  # left padding: real tokens so far
        else:
            pos = torch.full_like(nxt, base_len)
        kw["position_ids"] = pos

    def step():
        with torch.inference_mode():
            model(input_ids=nxt, use_cache=True, **with_cache(model, cache, **kw))

    return paired_steps(step, arms, cycles=cycles, warmup=warmup, device=device, baseline=baseline,
                        after_step=lambda: crop_cache(cache, base_len), progress=progress,
                        desc="timing decode steps")


def paired_prefill_steps(model, input_ids: torch.Tensor, arms: dict[str, Callable[[], object]],
                         cycles: int = 20, warmup: int = 2, attention_mask=None, progress: bool = False,
                         baseline: str = "vanilla", forward_kwargs: dict | None = None,
                         position_ids: bool = False) -> dict[str, ArmResult]:
    """Like :func:`paired_decode_steps` for the prefill: one forward over the whole prompt (fresh KV cache)."""
    device = input_ids.device
    kw = dict(forward_kwargs or {})
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask
    if position_ids:
        T = input_ids.shape[1]
        if attention_mask is not None:
            kw["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            kw["position_ids"] = torch.arange(T, device=device).expand(input_ids.shape[0], T)

    def step():
        with torch.inference_mode():
            model(input_ids=input_ids, use_cache=True, **kw)

    return paired_steps(step, arms, cycles=cycles, warmup=warmup, device=device, baseline=baseline,
                        progress=progress, desc="timing prefills")
