"""`fusesteer bench SUITE`: the parity, latency, GPU and serve suites of :mod:`fusesteer.bench`, one sub-command
per suite, each with its own options (:data:`fusesteer.bench.options.VERBS`).

This verb owns only the sub-commands: :func:`run` calls :func:`fusesteer.bench.runner.run`. The dependency goes one
way: ``fusesteer.bench`` never imports ``fusesteer.commands``. The suites themselves are imported only when the
verb runs (their import turns the Triton interpreter on for CPU parity; see :mod:`fusesteer.bench.interpreter`).
"""

from __future__ import annotations

from ..bench.options import EPILOG, VERBS

__all__ = ["register", "run"]


def register(sub, fmt):
    p = sub.add_parser("bench", formatter_class=fmt, help="parity, latency, GPU and serve benchmarks",
                       description="The benchmark suites: parity of every backend and the peer libraries against "
                                   "the reference hooks, interleaved paired latency against vanilla, the "
                                   "one-command GPU run, and the load test of `fusesteer serve`. Results: JSON, "
                                   "Markdown and PNG.",
                       epilog=EPILOG)
    suites = p.add_subparsers(dest="suite", metavar="SUITE")
    suites.required = True
    for name, (help_, description, add_arguments) in VERBS.items():
        v = suites.add_parser(name, formatter_class=fmt, help=help_, description=description)
        add_arguments(v)
        v.set_defaults(func=run)


def run(args) -> int:
    from ..bench.runner import run as run_suite

    return run_suite(args)
