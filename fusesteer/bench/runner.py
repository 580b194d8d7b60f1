"""`fusesteer bench {parity,latency,all,gpu,serve} ...`: runs the suite a parsed command line names and writes
its results (the options of each verb: :mod:`fusesteer.bench.options`).

Exit status: 0 when the gate of the suite passes (parity; gpu: kernel parity, model parity and zero recompiles)
or only latency / serve ran, 1 when it fails, 2 on a usage error (bad option, model that cannot load, CUDA
requested without a GPU: a :class:`~fusesteer.errors.FuseSteerError`, which the `fusesteer` command prints).
"""

from __future__ import annotations

import logging
import os

import torch

from . import common as C
from . import report as R
from .latency import LatencyConfig, run_latency
from .options import DTYPES
from .parity import ParityConfig, run_parity
from .paths import resolve_out


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise C.BenchError(f"--device {name!r}: expected cpu or cuda (cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise C.BenchError(f"--device {name!r}: expected cpu or cuda (cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise C.BenchError("--device cuda requested but no CUDA device is available here; use --device cpu")
    return dev


def _check(args) -> None:
    """The checks argparse cannot make; an option the verb does not have is not checked."""
    for name in ("cycles", "prefill_cycles", "steps", "threads"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise C.BenchError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    warmup, cycles = getattr(args, "warmup", None), getattr(args, "cycles", None)
    if warmup is not None and warmup < 0:
        raise C.BenchError(f"--warmup must be >= 0, got {warmup}")
    if cycles is not None and cycles < 5:
        raise C.BenchError(f"--cycles {cycles}: at least 5 timed cycles are needed for a median and a CI")
    if any(b < 1 for b in getattr(args, "batches", ())):
        raise C.BenchError(f"--batches must be positive, got {args.batches}")


def run(args) -> int:
    """Run the suite ``args.suite`` names (``args`` parsed with the verb's options); returns the exit status."""
    if args.suite == "gpu":
        from .gpu import cli as gpu_cli

        return gpu_cli(args)
    if args.suite == "serve":
        from .serve import cli as serve_cli

        return serve_cli(args)
    _check(args)
    dev = _device(args.device)
    threads = torch.get_num_threads()
    # full run: 2 threads; quick: 1 (tiny models gain nothing from threads, and on a shared,
    # oversubscribed box OpenMP spin-waiting makes 2 threads many times slower)
    torch.set_num_threads(args.threads or (1 if args.quick else 2))
    try:
        return _run(args, dev)
    finally:
        torch.set_num_threads(threads)


def _run(args, dev: torch.device) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.getLogger("fusesteer").setLevel(logging.WARNING)
    out = resolve_out(args.out, "quick" if args.quick else "")
    machine = C.machine_info(dev)
    mode = "quick (tiny random models)" if args.quick else f"full ({args.model})"
    print(f"fusesteer bench {args.suite}, {mode}, device {dev}, {torch.get_num_threads()} threads; "
          f"{machine['cpu_model']}; load average {machine['load_average_1_5_15']}")
    if args.quick and args.model != "smollm2-135m":
        print("  note: --model is ignored with --quick (tiny random models)")
    plots = not args.no_plots
    if plots and (why := R.plots_unavailable()):
        print(f"  note: no PNG plots: {why}")
        plots = False
    rc = 0
    if args.suite in ("parity", "all"):
        print("parity vs the reference hooks:")
        cfg = ParityConfig(quick=args.quick, model=args.model, device=str(dev), families=tuple(args.families),
                           dtypes=tuple(args.dtypes or DTYPES),
                           arms=tuple(a for a in args.arms if a not in ("reference", "hook")),
                           steps=args.steps, seed=args.seed, all_triton=args.all_triton)
        res = run_parity(cfg)
        R.write_json(out / R.PARITY_JSON, machine, res)
        if plots:
            R.plot_parity_layers(R.read_json(out / R.PARITY_JSON), out / R.PARITY_PNG)
        bad = [r for r in res["rows"] if r["status"] in ("FAIL", "ERROR", "vacuous")]
        print(f"parity gate: {'PASS' if res['ok'] else 'FAIL'} "
              f"({', '.join(f'{k} {v}' for k, v in res['counts'].items())}"
              f"; {res['seconds']} s)")
        for r in bad:
            print(f"  {r['status']}: {r['model']} {r['dtype']} {r['plan']} {r['arm']}: {r.get('reason', '')}")
        if not res["ok"]:
            rc = 1
    if args.suite in ("latency", "all"):
        print("latency (steered / vanilla, median of paired ratios):")
        cfg = LatencyConfig(quick=args.quick, model=args.model, device=str(dev), cycles=args.cycles,
                            prefill_cycles=args.prefill_cycles, warmup=args.warmup, batches=tuple(args.batches),
                            seed=args.seed, scenarios=tuple(args.scenarios), arms=tuple(args.arms),
                            progress=args.progress, protocol=args.protocol, phases=tuple(args.phases),
                            check_finite=args.check_finite, compiled=args.compiled,
                            checkpoint=lambda part: R.write_json(out / "latency.partial.json", machine, part))
        res = run_latency(cfg)
        (out / "latency.partial.json").unlink(missing_ok=True)
        jname, pname = ((R.LATENCY_JSON, R.LATENCY_PNG) if args.protocol == "attach"
                        else (R.LATENCY_COPIES_JSON, R.LATENCY_COPIES_PNG))
        R.write_json(out / jname, machine, res)
        if plots:
            R.plot_latency(R.read_json(out / jname), out / pname)
        if args.quick:
            print("  (quick mode: tiny model, the targets are not evaluated meaningfully)")
        else:
            for t in res["targets"]:
                print(f"  target {t['target']:13s} {t['what']:32s} {t['scenario']:11s} b{t['batch']} {t['phase']:7s} "
                      f"{t['median']:.3f} [{t['ci'][0]:.3f}, {t['ci'][1]:.3f}] <= {t['limit']}: "
                      f"{'met' if t['met'] else 'MISSED'}")
    path = R.write_report(out)
    mine = [n for n in (R.PARITY_JSON, R.LATENCY_JSON, R.LATENCY_COPIES_JSON, R.PARITY_PNG, R.LATENCY_PNG,
                        R.LATENCY_COPIES_PNG) if (out / n).exists()]
    print(f"results: {out} ({', '.join([path.name] + mine)})")
    return rc

