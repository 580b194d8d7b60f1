"""`fusesteer` command line: one verb per capability, thin wrappers over the Python API.

Each verb group lives in fusesteer/commands/<name>.py and exposes ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import FuseSteerError

# verb modules, in help order
COMMAND_MODULES = ["demo", "plan", "generate", "serve", "fusion", "austeer", "baseline", "eval", "bench", "supported"]


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusesteer", formatter_class=_Formatter,
        description="Fused-kernel activation steering for HF causal LMs.",
        epilog="examples:\n  fusesteer demo\n  fusesteer plan show plan.safetensors\n"
               "  fusesteer generate --model smollm2-135m --plan plan.safetensors --prompt 'Hello'")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        mod = importlib.import_module(f".commands.{name}", __package__)
        mod.register(sub, _Formatter)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given (`serve --tp N` re-runs itself)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fusesteer").setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        rc = args.func(args)
    except FuseSteerError as e:
        print(f"fusesteer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fusesteer: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
