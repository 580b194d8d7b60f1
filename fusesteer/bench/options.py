"""The command-line options of the bench suites, in one place: `fusesteer bench` (fusesteer/commands/bench.py) adds
them to its sub-command, `python -m fusesteer.bench` (:mod:`fusesteer.bench.runner`) to its own parser.

Imports nothing heavy (no torch, no suite): building the `fusesteer` parser must stay cheap and must not turn
the Triton interpreter on for the other verbs.
"""

from __future__ import annotations

import argparse

SUITES = ("parity", "latency", "all", "aot", "gpu")
DTYPES = ("fp32", "bf16", "fp16", "int8")
ARMS = ("torch", "triton", "fold", "auto", "reference", "hook", "steering-vectors", "repeng")
# the tiny model families (fusesteer.testing.TINY_FAMILIES; kept literal so building the CLI does not import torch,
# tests/test_families.py checks the two agree)
FAMILIES = ("llama", "gemma2", "gemma3", "qwen2", "qwen3", "mistral", "gemma", "granite", "phi3", "olmo2", "qwen3_moe")
EPILOG = """examples:
  fusesteer bench parity --quick            # CI gate: tiny models of every family, exits 1 on a regression
  fusesteer bench all --model smollm2-135m  # full CPU run: parity + latency (results: see --out)
  fusesteer bench latency --device cuda     # on a GPU: CUDA events, torch.compile + zero-recompile check
  fusesteer bench aot --out DIR             # no GPU needed: compile every kernel for sm_80/90/100 and gate
                                            # on spills and 128-bit access (exit 1 on a failure)
  fusesteer bench gpu                       # one NVIDIA GPU, <= 10 min: kernel parity + GB/s, decode ratios
                                            # eager and with CUDA graphs, zero-recompile check
  fusesteer bench gpu --dry-run             # any machine: print and build every step of `bench gpu`
"""


def add_arguments(p) -> None:
    """The bench options, added to ``p`` (the parser of `fusesteer bench` or of `python -m fusesteer.bench`)."""
    p.add_argument("suite", choices=SUITES, help="which suite to run")
    p.add_argument("--quick", action="store_true",
                   help="tiny random models of every family, a few seconds per suite (CI)")
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded model name or local HF folder for the full run (ignored with --quick)")
    p.add_argument("--out", default=None,
                   help="output folder (default: bench/results of the fusesteer source checkout holding the "
                        "current directory, else ./fusesteer-bench-results; a quick/ subfolder with --quick, aot/ "
                        "for aot)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 2 for the full run; unchanged with --quick)")
    p.add_argument("--cycles", type=int, default=None, help="decode timing cycles (default: quick 6, full 300)")
    p.add_argument("--prefill-cycles", type=int, default=None, help="prefill timing cycles (default: quick 5, full 60)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up cycles (default: quick 1, full 10)")
    p.add_argument("--steps", type=int, default=None, help="parity: greedy decode steps (default: quick 4, full 16)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=None,
                   help="parity dtypes (default: all); aot: a subset of fp32 fp16 bf16 (default: those three)")
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
    g = p.add_argument_group("aot (compile for NVIDIA targets without a GPU)")
    g.add_argument("--archs", nargs="+", type=int, choices=(80, 90, 100), default=[80, 90, 100],
                   help="aot: compute capabilities to compile for")
    g.add_argument("--jobs", type=int, default=None, help="aot: compile worker processes (default: min(4, CPUs))")
    g.add_argument("--no-cache", action="store_true",
                   help="aot: recompile every binary (default: reuse facts cached in $FUSESTEER_CACHE/aot)")
    g.add_argument("--inject", nargs="+", choices=("spill", "unaligned"), default=None,
                   help="aot: add a variant built to fail the gate (1 warp for an 8192-wide fp32 row; no "
                        "alignment specialization) to show the gate bites")
    g = p.add_argument_group("gpu (one NVIDIA GPU)")
    g.add_argument("--dry-run", action="store_true",
                   help="gpu: print every step and build what needs no GPU (plans, arms, kernel inputs); time nothing")
    g.add_argument("--budget", type=float, default=600.0,
                   help="gpu: time budget in seconds; steps that would not fit are skipped and listed")
    p.add_argument("--no-progress", action="store_true", help="aot / gpu: no progress bars")
    p.add_argument("--progress", action="store_true", help="progress bars for the timing loops")


def build_parser(prog: str = "python -m fusesteer.bench") -> argparse.ArgumentParser:
    """A stand-alone parser for the suites (`python -m fusesteer.bench`, `python -m bench`)."""
    p = argparse.ArgumentParser(prog=prog, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="fusesteer parity, latency, AOT-compile and GPU benchmarks")
    add_arguments(p)
    return p
