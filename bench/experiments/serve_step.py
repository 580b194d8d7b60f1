"""The server's decode step, steered with a plan per row vs unsteered, in one process: the engine's own
``Forwards.decode`` on its slot cache (what every decode step of ``fusesteer serve`` runs), batch B, the two arms
interleaved step by step; median of the paired throughput ratios with a bootstrap interval. This isolates the
steering cost inside the forward from the HTTP and scheduling noise of a served sweep (``fusesteer bench serve``).

    python bench/experiments/serve_step.py --batch 8 32 --out bench/results/serve

The plans are the serve benchmark's (``fusesteer.bench.common.per_row_plans``: an all-layer ``layer.out`` blend
plus k = 100 gains over ``attn.o_proj.in`` / ``mlp.down_proj.in``), one per row.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fusesteer import models  # noqa: E402
from fusesteer.bench.common import per_row_plans  # noqa: E402
from fusesteer.evaluate.stats import bootstrap_ci  # noqa: E402
from fusesteer.serve.forward import Forwards  # noqa: E402
from fusesteer.serve.steer import Steerer  # noqa: E402


def measure(model, batch: int, steps: int, backend: str) -> dict:
    plans = per_row_plans(model, batch)
    st = Steerer(model, backend=backend, capacity=batch + 8)
    st.ensure(plans, set())
    fw = Forwards(model, st, batch, 256)
    with torch.inference_mode():
        fw.start()

        def step(steered: bool) -> float:
            by = [(100 + i, 64, f"row{i}" if steered else None, 40) for i in range(batch)]
            t0 = time.perf_counter()
            fw.decode(by)
            return time.perf_counter() - t0
        for _ in range(5):
            step(True), step(False)
        pairs = [(step(False), step(True)) for _ in range(steps)]
    fw.close()
    st.close()
    ratios = [u / s for u, s in pairs]
    ci = bootstrap_ci(ratios, "median")
    return {"batch": batch, "steps": steps, "unsteered_ms": 1e3 * statistics.median(u for u, _ in pairs),
            "steered_ms": 1e3 * statistics.median(s for _, s in pairs), "ratio_median": ci.estimate,
            "ratio_ci95": [ci.low, ci.high]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = models.load(args.model, progress=False)
    rows = [measure(model, b, args.steps, args.backend) for b in args.batch]
    for r in rows:
        print(f"batch {r['batch']}: decode step unsteered {r['unsteered_ms']:.1f} ms, steered {r['steered_ms']:.1f} ms;"
              f" steered/unsteered throughput {r['ratio_median']:.3f} [{r['ratio_ci95'][0]:.3f}, "
              f"{r['ratio_ci95'][1]:.3f}]", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"model": args.model, "backend": args.backend, "threads": args.threads, "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(), "command": " ".join(sys.argv), "results": rows}
    (out / "serve_step.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
