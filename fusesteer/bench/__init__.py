"""fusesteer benchmark suites: parity and latency, side by side with vanilla, hooks and peer libraries; the
kernels compiled for NVIDIA targets without a GPU; the one-command GPU run; the `fusesteer serve` load test.
Part of the installed package: they run from any directory, no source checkout needed.

    fusesteer bench {parity,latency,all} [--quick] [--model smollm2-135m] [--out DIR] [--device cpu|cuda]
    fusesteer bench aot [--out DIR]      (no GPU needed: compile every kernel variant for sm_80/90/100, gate)
    fusesteer bench gpu [--dry-run]      (one NVIDIA GPU, <= 10 min; --dry-run anywhere)
    python -m fusesteer.bench ...        (the same commands; `python -m bench ...` in a checkout)
    python -m fusesteer.bench.serve      (load test of `fusesteer serve` on loopback)

Results go to ``--out``; by default to ``bench/results`` (``bench/results/quick`` with ``--quick``) when run
inside a fusesteer source checkout, else to ``./fusesteer-bench-results`` under the current directory
(:mod:`fusesteer.bench.paths`).

Modules: :mod:`~fusesteer.bench.options` (the command-line options, shared by `fusesteer bench` and
`python -m fusesteer.bench`), :mod:`~fusesteer.bench.runner` (runs a parsed command line),
:mod:`~fusesteer.bench.parity` (every backend and the peers vs the reference hooks),
:mod:`~fusesteer.bench.latency` (interleaved paired step timing), :mod:`~fusesteer.bench.report` (JSON,
Markdown, plots), :mod:`~fusesteer.bench.thresholds` (the parity thresholds shared with the tests),
:mod:`~fusesteer.bench.aot` / :mod:`~fusesteer.bench.aot_compile` / :mod:`~fusesteer.bench.aot_ptx` (the AOT
compile check), :mod:`~fusesteer.bench.roofline` (the static roofline prediction), :mod:`~fusesteer.bench.gpu`
/ :mod:`~fusesteer.bench.gpu_kernels` (the GPU run), :mod:`~fusesteer.bench.serve` (the serve load test),
:mod:`~fusesteer.bench.common` (machine info, models, plans, arms), :mod:`~fusesteer.bench.paths` (the
default results folder), :mod:`~fusesteer.bench.interpreter` (the Triton interpreter on CPU).

Not in the package (source checkout only): the one-off experiment scripts in ``bench/experiments/`` and the
checked-in results in ``bench/results/``, and the pytest-benchmark kernel microbenchmarks (CUDA only),
run from the checkout's root with ``pytest bench/test_kernels_bench.py --benchmark-group-by=group``.

The suites import :mod:`~fusesteer.bench.interpreter`, which turns the Triton interpreter on for a machine
without CUDA (see there); importing this package alone does not. ``fusesteer.bench`` never imports
``fusesteer.commands`` (the `fusesteer bench` verb calls in here, never the other way).
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "INTERPRETER_AT_IMPORT":  # resolved on first use: the import decides the interpreter
        from .interpreter import INTERPRETER_AT_IMPORT

        return INTERPRETER_AT_IMPORT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv=None) -> int:
    """`python -m fusesteer.bench ARGS`: parse ``argv`` and run; returns the exit status (2 on a usage error)."""
    from .runner import main as _main

    return _main(argv)


__all__ = ["INTERPRETER_AT_IMPORT", "main"]
