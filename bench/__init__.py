"""fusesteer benchmark suite: parity and latency, side by side with vanilla, hooks and peer libraries; the
kernels compiled for NVIDIA targets without a GPU; the one-command GPU run.

    python -m bench {parity,latency,all} [--quick] [--model smollm2-135m] [--out DIR] [--device cpu|cuda]
    python -m bench aot [--out DIR]        (no GPU needed: compile every kernel variant for sm_80/90/100, gate)
    python -m bench gpu [--dry-run]        (one NVIDIA GPU, <= 10 min; --dry-run anywhere)
    fusesteer bench ...            (the same commands through the fusesteer CLI)

Modules: :mod:`bench.parity` (every backend and the peers vs the reference hooks), :mod:`bench.latency`
(interleaved paired step timing), :mod:`bench.report` (JSON, Markdown, plots), :mod:`bench.thresholds`
(the parity thresholds shared with the tests), :mod:`bench.aot` / :mod:`bench.aot_compile` / :mod:`bench.aot_ptx`
(the AOT compile check), :mod:`bench.roofline` (the static roofline prediction), :mod:`bench.gpu` /
:mod:`bench.gpu_kernels` (the GPU run), :mod:`bench.runner` (the command line).
``bench/test_kernels_bench.py`` holds the pytest-benchmark kernel microbenchmarks (CUDA only).

On a machine without CUDA, importing this package turns the Triton interpreter on (``TRITON_INTERPRET=1``)
unless the variable is already set or Triton is already imported: Triton's own library functions
(``tl.sum`` ...) are built at Triton's import under the setting of that moment, so the interpreter must be on
before the first ``import triton`` for the ``triton`` backend's parity rows to run on CPU.
"""

from __future__ import annotations

import os
import sys


def _enable_interpreter_on_cpu() -> bool:
    if "TRITON_INTERPRET" in os.environ:
        return os.environ["TRITON_INTERPRET"] not in ("", "0")
    if "triton" in sys.modules:
        return False
    import torch

    if torch.cuda.is_available():
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True


#: True when the Triton interpreter was on before Triton was imported (CPU parity of the triton backend).
INTERPRETER_AT_IMPORT = _enable_interpreter_on_cpu()


def main(argv=None) -> int:
    from .runner import main as _main

    return _main(argv)


__all__ = ["INTERPRETER_AT_IMPORT", "main"]
