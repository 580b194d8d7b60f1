"""Side-by-side decode-step timing (the method of DESIGN §5).

Whole-generate timings wander ±10-15% on shared VMs. Instead: prefill once, then time one decode step at a
time on a fixed KV cache (cropped back after each step), interleave the arms step by step (A B C A B C ...),
and report the median of paired ratios arm/vanilla with a bootstrap confidence interval.
"""

from __future__ import annotations

import random
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class ArmResult:
    name: str
    times_ms: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    def summary(self, seed: int = 0) -> dict:
        med = statistics.median(self.times_ms) if self.times_ms else float("nan")
        out = {"arm": self.name, "median_ms": med, "n": len(self.times_ms)}
        if self.ratios:
            lo, hi = bootstrap_median_ci(self.ratios, seed=seed)
            out.update(ratio_median=statistics.median(self.ratios), ratio_ci_low=lo, ratio_ci_high=hi,
                       ratio_min=min(self.ratios), ratio_max=max(self.ratios))
        return out


def bootstrap_median_ci(values, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    n = len(values)
    meds = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(n_boot))
    return meds[int(alpha / 2 * n_boot)], meds[int((1 - alpha / 2) * n_boot) - 1]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_decode_steps(model, input_ids: torch.Tensor, arms: dict[str, Callable[[], object]],
                        cycles: int = 100, warmup: int = 5, attention_mask=None, progress: bool = False,
                        baseline: str = "vanilla") -> dict[str, ArmResult]:
    """Time one cached decode step per arm per cycle, arms interleaved in a shuffled order each cycle.

    ``arms``: name -> zero-arg callable returning a context manager that sets the arm up (e.g.
    ``lambda: fs.attach(model, plan, backend="torch")``) or None for vanilla. Set-up is outside the timing.
    """
    from tqdm.auto import tqdm

    device = input_ids.device
    names = list(arms)
    if baseline not in names:
        raise ValueError(f"baseline arm {baseline!r} missing from arms {names}")
    results = {n: ArmResult(n) for n in names}
    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        cache = out.past_key_values
        base_len = cache.get_seq_length()
        nxt = out.logits[:, -1:].argmax(-1)
        mask = None
        if attention_mask is not None:
            mask = torch.cat([attention_mask, torch.ones_like(nxt)], dim=1)
        rng = random.Random(0)
        it = range(warmup + cycles)
        if progress:
            it = tqdm(it, desc="timing decode steps", leave=False)
        for c in it:
            order = names[:]
            rng.shuffle(order)
            cyc = {}
            for n in order:
                factory = arms[n]
                ctx = factory() if factory is not None else None
                with (ctx if ctx is not None else nullcontext()):
                    _sync(device)
                    t0 = time.perf_counter()
                    model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
                    _sync(device)
                    dt = (time.perf_counter() - t0) * 1e3
                cache.crop(base_len)
                cyc[n] = dt
            if c >= warmup:
                for n in names:
                    results[n].times_ms.append(cyc[n])
                    if n != baseline:
                        results[n].ratios.append(cyc[n] / cyc[baseline])
    return results
