"""`fusesteer bench`: the parity and latency suites of the repository's bench/ folder.

The suites live in ``bench/`` next to the ``fusesteer`` package (a source checkout); this verb defines the
command-line options (shared with ``python -m bench``) and runs them.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from ..errors import FuseSteerError

SUITES = ("parity", "latency", "all")
DTYPES = ("fp32", "bf16", "fp16", "int8")
ARMS = ("torch", "triton", "fold", "auto", "reference", "hook", "steering-vectors", "repeng")
FAMILIES = ("llama", "gemma2", "gemma3", "qwen2", "qwen3")
EPILOG = """examples:
  fusesteer bench parity --quick            # CI gate: tiny models of every family, exits 1 on a regression
  fusesteer bench all --model smollm2-135m  # full CPU run: parity + latency, results in bench/results/
  fusesteer bench latency --device cuda     # on a GPU: CUDA events, torch.compile + zero-recompile check
"""


def add_arguments(p) -> None:
    """The bench options (used by both `fusesteer bench` and `python -m bench`)."""
    p.add_argument("suite", choices=SUITES, help="which suite to run")
    p.add_argument("--quick", action="store_true",
                   help="tiny random models of every family, a few seconds per suite (CI)")
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded model name or local HF folder for the full run (ignored with --quick)")
    p.add_argument("--out", default=None,
                   help="output folder (default: bench/results, or bench/results/quick with --quick)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 2 for the full run; unchanged with --quick)")
    p.add_argument("--cycles", type=int, default=None, help="decode timing cycles (default: quick 6, full 300)")
    p.add_argument("--prefill-cycles", type=int, default=None, help="prefill timing cycles (default: quick 5, full 60)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up cycles (default: quick 1, full 10)")
    p.add_argument("--steps", type=int, default=None, help="parity: greedy decode steps (default: quick 4, full 16)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), help="parity dtypes")
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                   help="parity --quick: tiny model families")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                   help="backends/peers to include (vanilla and the reference are always run)")
    p.add_argument("--scenarios", nargs="+", choices=("blend+gains", "additive", "per-row"),
                   default=["blend+gains", "additive", "per-row"], help="latency scenarios")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="latency batch sizes")
    p.add_argument("--check-finite", action="store_true",
                   help="latency: attach our arms with check_finite=True (default off: that check runs once per "
                        "attach, so the attach protocol would charge it to every timed step)")
    p.add_argument("--phases", nargs="+", choices=("decode", "prefill"), default=["decode", "prefill"],
                   help="latency phases")
    p.add_argument("--protocol", choices=("attach", "copies"), default="attach",
                   help="latency: 'attach' = one model, each arm attached/detached around its timed step "
                        "; 'copies' = one deep copy of the model per arm, arm applied once (no set-up "
                        "churn next to the timed step; one model copy per arm in memory)")
    p.add_argument("--compiled", action="store_true",
                   help="latency: also time static-cache torch.compile(fullgraph) decode steps: compiled steered vs "
                        "compiled vanilla vs eager vanilla, per batch size (always on with CUDA; inductor on CPU "
                        "compiles for minutes)")
    p.add_argument("--all-triton", action="store_true",
                   help="parity --quick on CPU: run every Triton (interpreter) row, not just a few (slow)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="progress bars for the timing loops")


def _import_bench():
    try:
        return importlib.import_module("bench.runner")
    except ImportError as first:
        root = Path(__file__).resolve().parents[2]
        if (root / "bench" / "runner.py").is_file():
            sys.path.insert(0, str(root))
            try:
                return importlib.import_module("bench.runner")
            except ImportError as e:
                raise FuseSteerError(f"cannot import the bench suite from {root / 'bench'}: {e}") from None
        raise FuseSteerError(
            "the benchmark suite lives in the bench/ folder of the fusesteer source repository, which is not "
            f"part of the installed package ({first}); run it from a checkout: `python -m bench ...` or "
            "`fusesteer bench ...` with the checkout installed in editable mode (pip install -e .)") from None


def register(sub, fmt):
    p = sub.add_parser("bench", formatter_class=fmt, help="parity and latency benchmarks (bench/ suites)",
                       description="Parity of every backend and the peer libraries against the reference hooks, "
                                   "and interleaved paired latency against vanilla; JSON, Markdown and PNG "
                                   "results. Same as `python -m bench`.",
                       epilog=EPILOG)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    return _import_bench().run(args)
