"""`fusesteer bench`: the parity, latency, AOT-compile and GPU suites of :mod:`fusesteer.bench`.

This verb owns only the sub-command: the options come from :mod:`fusesteer.bench.options` (shared with
`python -m fusesteer.bench`) and :func:`run` calls :func:`fusesteer.bench.runner.run`. The dependency goes one
way: ``fusesteer.bench`` never imports ``fusesteer.commands``. The suites themselves are imported only when the
verb runs (their import turns the Triton interpreter on for CPU parity; see :mod:`fusesteer.bench.interpreter`).
"""

from __future__ import annotations

from ..bench.options import ARMS, DTYPES, EPILOG, FAMILIES, SUITES, add_arguments

__all__ = ["ARMS", "DTYPES", "EPILOG", "FAMILIES", "SUITES", "add_arguments", "register", "run"]


def register(sub, fmt):
    p = sub.add_parser("bench", formatter_class=fmt, help="parity, latency, AOT-compile and GPU benchmarks",
                       description="Parity of every backend and the peer libraries against the reference hooks, "
                                   "interleaved paired latency against vanilla, the kernels compiled for "
                                   "sm_80/90/100 without a GPU (aot), and the one-command GPU run (gpu); JSON, "
                                   "Markdown and PNG results. Same as `python -m fusesteer.bench`.",
                       epilog=EPILOG)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..bench.runner import run as run_suites

    return run_suites(args)
