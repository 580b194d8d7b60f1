"""fusesteer benchmark suites: parity and latency, side by side with vanilla, hooks and peer libraries; the
one-command GPU run; the `fusesteer serve` load test. Part of the installed package: they run from any directory,
no source checkout needed. One spelling, `fusesteer bench SUITE`, each suite with its own options:

    fusesteer bench {parity,latency,all} [--quick] [--model smollm2-135m] [--out DIR] [--device cpu|cuda]
    fusesteer bench gpu [--dry-run]      (one NVIDIA GPU, <= 10 min; --dry-run anywhere)
    fusesteer bench serve [--quick]      (load test of `fusesteer serve` on loopback)

Results go to ``--out``; by default to ``bench/results`` (``bench/results/quick`` with ``--quick``) when run
inside a fusesteer source checkout, else to ``./fusesteer-bench-results`` under the current directory
(:mod:`fusesteer.bench.paths`).

Modules: :mod:`~fusesteer.bench.options` (the command-line options of each suite, which `fusesteer bench` turns
into sub-commands), :mod:`~fusesteer.bench.runner` (runs a parsed command line),
:mod:`~fusesteer.bench.parity` (every backend and the peers vs the reference hooks),
:mod:`~fusesteer.bench.latency` (interleaved paired step timing), :mod:`~fusesteer.bench.report` (JSON,
Markdown, plots), :mod:`fusesteer.tolerances` (the parity thresholds shared with the tests),
:mod:`~fusesteer.bench.gpu` / :mod:`~fusesteer.bench.gpu_kernels` (the GPU run),
:mod:`~fusesteer.bench.traffic` (the bytes each kernel call and decode step moves), :mod:`~fusesteer.bench.serve`
(the serve load test), :mod:`~fusesteer.bench.common` (machine info, models, plans, arms),
:mod:`~fusesteer.bench.paths` (the default results folder), :mod:`~fusesteer.bench.interpreter` (the Triton
interpreter on CPU).

Not in the package (source checkout only, the folder ``bench/``): developer tooling -- the AOT compile check of
the kernels for sm_80/90/100 with its PTX/cubin analysis and static roofline (``python -m bench.aot``) --, the
one-off experiment scripts in ``bench/experiments/``, the checked-in results in ``bench/results/``, and the
pytest-benchmark kernel microbenchmarks (CUDA only), run from the checkout's root with
``pytest bench/test_kernels_bench.py --benchmark-group-by=group``.

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


__all__ = ["INTERPRETER_AT_IMPORT"]
