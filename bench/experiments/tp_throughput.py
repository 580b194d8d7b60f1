"""Steering under tensor parallelism on this CPU (gloo): decode tokens/s at TP=N against one process, and the
per-step cost of steering at TP=N (steered / unsteered through the same attached handle, arms interleaved step by
step on a fixed KV cache, median of paired ratios with a bootstrap interval).

    python bench/experiments/tp_throughput.py --out bench/results/tp                 # writes the model, runs TP 1 and 2
    torchrun --nproc-per-node 2 bench/experiments/tp_throughput.py --worker FOLDER   # one arm (what the above runs)

The model is a random-weight Llama (8 layers, hidden 1024, 16 heads): SmolLM2-135M's 9 heads and 3 kv heads do
not split over 2 ranks. Honest expectation: gloo over 2 shared cores is not faster than one process.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

CONFIG = dict(num_hidden_layers=8, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
              num_key_value_heads=8, head_dim=64, vocab_size=4096)


def worker(folder: str, out: str, steps: int, batch: int, ctx: int) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import fusesteer as fs
    from fusesteer.evaluate.stats import bootstrap_ci
    from fusesteer.runtime.compat import output_cache, tensor_parallel_kwargs

    parallel = "RANK" in os.environ
    model = AutoModelForCausalLM.from_pretrained(folder, **(tensor_parallel_kwargs("auto") if parallel else {})).eval()
    torch.manual_seed(0)
    plan = fs.SteeringPlan.for_model(model)
    for layer in range(model.config.num_hidden_layers):
        plan.add(layer=layer, site="layer.out", b=0.01 * torch.randn(model.config.hidden_size))
        plan.add(layer=layer, site="attn.o_proj.in", a=1 + 0.01 * torch.randn(plan.spec.attn_width))
    ids = torch.randint(3, model.config.vocab_size, (batch, ctx), generator=torch.Generator().manual_seed(1))
    nxt = torch.randint(3, model.config.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = output_cache(model(ids, use_cache=True))

        def step():
            model(nxt, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # drop the token just added: every step runs on the same cache

        for _ in range(3):
            step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        vanilla = (time.perf_counter() - t0) / steps
        ratios = []
        with fs.attach(model, {"p": plan}, backend="torch", sites="all") as h:
            for i in range(steps):
                arms = (("p", None) if i % 2 == 0 else (None, "p"))
                t = {}
                for arm in arms:
                    h.route_all(arm)
                    t0 = time.perf_counter()
                    step()
                    t[arm] = time.perf_counter() - t0
                ratios.append(t["p"] / t[None])
    iv = bootstrap_ci(ratios, "median", seed=0)
    res = {"world": int(os.environ.get("WORLD_SIZE", 1)), "batch": batch, "ctx": ctx, "steps": steps,
           "decode_step_ms": vanilla * 1e3, "tokens_per_s": batch / vanilla,
           "steered_over_unsteered": {"median": iv.estimate, "low": iv.low, "high": iv.high}}
    if not parallel or dist.get_rank() == 0:
        Path(out).write_text(json.dumps(res, indent=1))
    if parallel:
        dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench/results/tp")
    ap.add_argument("--world", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=64)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.result, a.steps, a.batch, a.ctx)
        return 0
    from fusesteer.testing import tiny

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = out / "model"
    tiny("llama", **CONFIG).save_pretrained(folder)
    results = []
    for n in a.world:
        res = out / f"tp{n}.json"
        args = [str(Path(__file__).resolve()), "--worker", str(folder), "--result", str(res), "--steps", str(a.steps),
                "--batch", str(a.batch), "--ctx", str(a.ctx)]
        if n == 1:
            cmd = [sys.executable] + args
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr",
                   "127.0.0.1", "--master-port", str(port)] + args
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // n))}
        subprocess.run(cmd, check=True, env=env, timeout=1200)
        results.append(json.loads(res.read_text()))
    import shutil

    shutil.rmtree(folder)
    summary = {"machine": "2 shared vCPUs, no GPU, gloo", "model": f"random-weight Llama {CONFIG}", "runs": results}
    (out / "tp.json").write_text(json.dumps(summary, indent=1))
    for r in results:
        st = r["steered_over_unsteered"]
        print(f"TP={r['world']}: {r['tokens_per_s']:.1f} tok/s (decode step {r['decode_step_ms']:.1f} ms, batch "
              f"{r['batch']}, {r['ctx']}-token cache); steered/unsteered {st['median']:.3f} "
              f"[{st['low']:.3f}, {st['high']:.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
