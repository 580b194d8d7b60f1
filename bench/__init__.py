"""The source checkout's bench folder: what is *not* installed with fusesteer.

* ``experiments/``: one-off result scripts (``python bench/experiments/<name>.py``; AUSteer, Fusion Steering,
  fold memory), writing to ``results/``;
* ``results/``: the checked-in results the README quotes;
* ``test_kernels_bench.py``: pytest-benchmark kernel microbenchmarks (CUDA only):
  ``pytest bench/test_kernels_bench.py --benchmark-group-by=group`` from the checkout's root.

The suites themselves are the package :mod:`fusesteer.bench` (``fusesteer bench ...``); ``python -m bench ...``
and ``python -m bench.serve`` stay as thin aliases of ``python -m fusesteer.bench ...`` and
``python -m fusesteer.bench.serve``.
"""

from fusesteer.bench import main

__all__ = ["main"]
