"""Where the bench writes: the results folder of a fusesteer source checkout, or one under the current directory.

A *checkout* is a folder holding a ``pyproject.toml`` whose project is ``fusesteer`` next to a ``bench/`` folder
(the developer tooling, the experiments and the checked-in results). Run from anywhere inside one, the suites write
to its ``bench/results``; anywhere else (a plain ``pip install fusesteer``) to ``./fusesteer-bench-results``.
``--out`` always wins.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import BenchError

PROJECT = "fusesteer"
OUTSIDE_CHECKOUT = "fusesteer-bench-results"  # the default results folder outside a checkout, under the cwd
#: the package's parent folder: what a subprocess needs on PYTHONPATH to import this very fusesteer
PACKAGE_PARENT = Path(__file__).resolve().parents[2]


def _project_name(pyproject: Path) -> str | None:
    try:
        text = pyproject.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    try:
        import tomllib
    except ImportError:  # Python 3.10: the [project] table's name line
        m = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
        n = m and re.search(r"""^name\s*=\s*["']([^"']+)["']""", m.group(1), re.M)
        return n.group(1) if n else None
    try:
        name = tomllib.loads(text).get("project", {}).get("name")
    except ValueError:  # tomllib.TOMLDecodeError
        return None
    return name if isinstance(name, str) else None


def is_checkout(folder: Path) -> bool:
    """True when ``folder`` is the root of a fusesteer source checkout (pyproject of fusesteer + bench/)."""
    folder = Path(folder)
    return (folder / "bench").is_dir() and _project_name(folder / "pyproject.toml") == PROJECT


def checkout_root(start: Path | str | None = None) -> Path | None:
    """The fusesteer checkout holding ``start`` (default: the current directory), or None."""
    here = Path(start if start is not None else Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if is_checkout(folder):
            return folder
    return None


def package_checkout() -> Path | None:
    """The checkout this fusesteer package was imported from (editable install / PYTHONPATH), or None when it
    is an installed copy (site-packages)."""
    return PACKAGE_PARENT if is_checkout(PACKAGE_PARENT) else None


def results_root(cwd: Path | str | None = None) -> Path:
    """``<checkout>/bench/results`` inside a checkout, else ``<cwd>/fusesteer-bench-results``."""
    root = checkout_root(cwd)
    if root is not None:
        return root / "bench" / "results"
    return Path(cwd if cwd is not None else Path.cwd()).resolve() / OUTSIDE_CHECKOUT


def default_out(*parts: str, cwd: Path | str | None = None) -> Path:
    """The default output folder of a suite: :func:`results_root` joined with ``parts`` (e.g. ``"quick"``)."""
    return results_root(cwd).joinpath(*[p for p in parts if p])


def resolve_out(out: str | Path | None, *parts: str, create: bool = True) -> Path:
    """``--out`` when given, else :func:`default_out` of ``parts``; created unless ``create`` is False. A path that
    names a file, or a folder that cannot be created, is a :class:`BenchError` (exit 2), not a traceback."""
    path = Path(out).expanduser() if out else default_out(*parts)
    if path.exists() and not path.is_dir():
        raise BenchError(f"output folder {str(path)!r} exists and is not a folder (--out)")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BenchError(f"cannot create the output folder {str(path)!r} (--out): {e}") from None
    return path
