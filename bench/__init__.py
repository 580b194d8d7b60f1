"""The source checkout's bench folder: what is *not* installed with fusesteer (the user suites are the package
:mod:`fusesteer.bench`, run as ``fusesteer bench SUITE``).

* developer tooling, run from the checkout's root:

  - ``python -m bench.aot [--out DIR]``: the AOT compile check -- every Triton kernel variant compiled for
    sm_80/90/100 without a GPU, registers / spills / access widths read from the cubins and the PTX, and gated
    (:mod:`bench.aot`, :mod:`bench.aot_compile` (its worker process), :mod:`bench.aot_ptx`), with the static
    roofline prediction in its report (:mod:`bench.roofline`); CI runs it through ``tests/test_aot.py``;
  - ``test_kernels_bench.py``: pytest-benchmark kernel microbenchmarks (CUDA only):
    ``pytest bench/test_kernels_bench.py --benchmark-group-by=group``;

* ``experiments/``: one-off result scripts (``python bench/experiments/<name>.py``; AUSteer, Fusion Steering,
  fold memory), writing to ``results/``;
* ``results/``: the checked-in results the README quotes.

The tooling imports ``fusesteer``; nothing in ``fusesteer`` imports it.
"""
