"""Validation sweeps of a plan builder's two parameters, and what they tell the user.

:func:`sweep` evaluates a grid of (structure, strength) settings on validation records with one attach per
structure value and ``handle.update()`` for each strength (values change in place); :class:`SweepResult`
holds the accuracies, picks the best cell and writes the JSON / markdown table / heatmap PNG.

A result also says out loud what a user would otherwise have to notice: ``warnings`` from the caller (e.g.
fewer contrastive pairs than asked), :meth:`SweepResult.edges` — the best cell sitting on an edge of the grid,
with the next values to try (:func:`next_values`) — and ``reproduce``, the exact command that rebuilds the
best cell's plan.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..extras import require
from ..runtime.plan import SteeringPlan
from .austeer import AUSteerError

__all__ = ["SweepResult", "sweep", "next_values", "grid_edge"]


# --------------------------------------------------------------------------------------------
# Grid edges
# --------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def next_values(values: Sequence, edge: str, *, lo=None, hi=None, additive: bool = False, count: int = 2) -> list:
    """The next ``count`` values beyond the ``edge`` ("low" or "high") of a grid axis.

    Geometric grids continue by the ratio of the two outermost values (5, 10, 20 -> 40, 80), additive ones
    (``additive``, e.g. layer indices) by their difference (6, 12, 18 -> 24, 30); one value alone doubles or
    halves (additive: steps by 1); a geometric grid never steps to zero or below. Integer axes (all values
    ints) are rounded, others kept to three significant digits. Values outside [lo, hi] or already in the
    grid are dropped, so an edge that is a hard bound (k = 1, the last layer) gives [].
    """
    if edge not in ("low", "high"):
        raise AUSteerError(f"edge must be 'low' or 'high', got {edge!r}")
    vals = sorted({float(v) for v in values})
    if not vals:
        return []
    integer = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    x, nb = (vals[-1], vals[-2] if len(vals) > 1 else None) if edge == "high" else \
        (vals[0], vals[1] if len(vals) > 1 else None)
    sign = 1.0 if edge == "high" else -1.0
    out = []
    geometric = not (additive or x <= 0 or (nb is not None and nb <= 0))
    if geometric:
        r = (x / nb) if nb is not None else 2.0
        r = r if r > 1 else 1 / r
        cand = [x * r ** (sign * i) for i in range(1, count + 1)]
    else:
        d = abs(x - nb) if nb is not None else 1.0
        cand = [x + sign * d * i for i in range(1, count + 1)]
    for c in cand:
        c = float(round(c)) if integer else float(f"{c:.3g}")
        if (lo is not None and c < lo) or (hi is not None and c > hi) or c in vals or (geometric and c <= 0):
            continue
        c = int(c) if integer else c
        if c not in out:
            out.append(c)
    return out


def grid_edge(name: str, values: Sequence, best, *, lo=None, hi=None, additive: bool = False) -> dict | None:
    """``{"axis", "edge", "value", "grid", "suggest"}`` when ``best`` is the smallest or largest of two or more
    ``values`` and the grid can be extended past it (see :func:`next_values`); None otherwise."""
    vals = sorted(set(values))
    if len(vals) < 2:
        return None  # a single value is a fixed setting, not a searched axis
    edge = "high" if best == vals[-1] else "low" if best == vals[0] else None
    if edge is None:
        return None
    nxt = next_values(values, edge, lo=lo, hi=hi, additive=additive)
    if not nxt:
        return None
    return {"axis": name, "edge": edge, "value": best, "grid": [vals[0], vals[-1]], "suggest": nxt}


def edge_message(e: Mapping) -> str:
    word = "largest" if e["edge"] == "high" else "smallest"
    more = "larger" if e["edge"] == "high" else "smaller"
    return (f"best {e['axis']}={_fmt(e['value'])} is the {word} value of its grid "
            f"({_fmt(e['grid'][0])}..{_fmt(e['grid'][1])}); a {more} value might be better: try --{e['axis']} "
            + " ".join(_fmt(v) for v in e["suggest"]))


@dataclass
class SweepResult:
    """Validation accuracy over a grid: rows = structure values (k, layer, #heads), cols = strengths."""

    method: str
    row_name: str
    col_name: str
    rows: list
    cols: list
    accuracy: list  # [len(rows)][len(cols)]
    correct: list
    n: int
    vanilla_accuracy: float | None = None
    vanilla_correct: int | None = None
    seconds: float = 0.0
    info: dict = field(default_factory=dict)
    #: {axis name: {"lo", "hi", "additive"}}: the limits of each axis, for the grid-edge check
    bounds: dict = field(default_factory=dict)
    #: messages the caller wants said next to the results (e.g. fewer pairs than asked)
    warnings: list = field(default_factory=list)
    #: {"command": str, "argv": [...], "plan": file or None}: how to rebuild the best cell's plan
    reproduce: dict | None = None
    #: generated-answer scoring: continuations that matched no option, per cell, and for the unsteered model
    non_answers: list | None = None
    vanilla_non_answers: int | None = None

    @property
    def best(self) -> dict:
        """Highest accuracy; ties go to the smaller row value (steer less), then the smaller strength."""
        cands = []
        for i, r in enumerate(self.rows):
            for j, c in enumerate(self.cols):
                acc = self.accuracy[i][j]
                if acc is None or not math.isfinite(acc):
                    continue
                cands.append((-acc, i, j))
        if not cands:
            raise AUSteerError("sweep has no finite accuracy")
        _, i, j = min(cands)
        return {self.row_name: self.rows[i], self.col_name: self.cols[j], "accuracy": self.accuracy[i][j],
                "correct": self.correct[i][j], "n": self.n}

    @property
    def edges(self) -> list[dict]:
        """The axes whose best value lies on an edge of the grid that could be extended (:func:`grid_edge`)."""
        best = self.best
        out = []
        for name, vals in ((self.row_name, self.rows), (self.col_name, self.cols)):
            b = self.bounds.get(name, {})
            e = grid_edge(name, vals, best[name], lo=b.get("lo"), hi=b.get("hi"), additive=b.get("additive", False))
            if e is not None:
                out.append(e)
        return out

    @property
    def all_warnings(self) -> list[str]:
        """The caller's warnings, then one per grid edge."""
        return list(self.warnings) + [edge_message(e) for e in self.edges]

    def to_dict(self) -> dict:
        return {"method": self.method, "row_name": self.row_name, "col_name": self.col_name,
                "rows": self.rows, "cols": self.cols, "accuracy": self.accuracy, "correct": self.correct,
                "n": self.n, "vanilla_accuracy": self.vanilla_accuracy, "vanilla_correct": self.vanilla_correct,
                "best": self.best, "grid_edges": self.edges, "warnings": self.all_warnings,
                "reproduce": self.reproduce, "non_answers": self.non_answers,
                "vanilla_non_answers": self.vanilla_non_answers, "seconds": self.seconds, "info": self.info}

    def markdown(self) -> str:
        head = f"| {self.row_name} \\ {self.col_name} | " + " | ".join(str(c) for c in self.cols) + " |"
        sep = "|---|" + "---:|" * len(self.cols)
        best = self.best
        lines = [f"**{self.method}** — validation accuracy (n = {self.n})"
                 + (f"; vanilla {self.vanilla_accuracy:.3f}" if self.vanilla_accuracy is not None else "")
                 + f"; best {self.row_name}={best[self.row_name]}, {self.col_name}={best[self.col_name]} "
                   f"({best['accuracy']:.3f})", "", head, sep]
        for i, r in enumerate(self.rows):
            cells = []
            for j, c in enumerate(self.cols):
                acc = self.accuracy[i][j]
                s = "nan" if acc is None or not math.isfinite(acc) else f"{acc:.3f}"
                if r == best[self.row_name] and c == best[self.col_name]:
                    s = f"**{s}**"
                cells.append(s)
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
        warns = self.all_warnings
        if warns:
            lines += [""] + [f"- warning: {w}" for w in warns]
        if self.reproduce:
            lines += ["", "Rebuild the best plan:", "", f"    {self.reproduce['command']}"]
            if self.reproduce.get("plan"):
                lines += ["", f"(the same plan is saved as `{self.reproduce['plan']}`)"]
        return "\n".join(lines) + "\n"

    def heatmap(self, path: str | Path, title: str | None = None) -> None:
        matplotlib = require("matplotlib", "methods", "the AUSteer sweep heatmap")

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
        import numpy as np

        acc = np.array([[np.nan if a is None else a for a in row] for row in self.accuracy], dtype=float)
        fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(self.cols), 1.2 + 0.55 * len(self.rows)))
        im = ax.imshow(acc, cmap="viridis", aspect="auto", vmin=np.nanmin(acc) if np.isfinite(acc).any() else 0,
                       vmax=np.nanmax(acc) if np.isfinite(acc).any() else 1)
        ax.set_xticks(range(len(self.cols)), [str(c) for c in self.cols])
        ax.set_yticks(range(len(self.rows)), [str(r) for r in self.rows])
        ax.set_xlabel(self.col_name)
        ax.set_ylabel(self.row_name)
        best = self.best
        for i in range(len(self.rows)):
            for j in range(len(self.cols)):
                if np.isfinite(acc[i, j]):
                    is_best = self.rows[i] == best[self.row_name] and self.cols[j] == best[self.col_name]
                    ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="red" if is_best else "white", fontweight="bold" if is_best else "normal")
        t = title or self.method
        if self.vanilla_accuracy is not None:
            t += f" (vanilla {self.vanilla_accuracy:.3f}, n={self.n})"
        ax.set_title(t, fontsize=9)
        fig.colorbar(im, ax=ax, label="validation accuracy")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def write(self, out_dir: str | Path, stem: str = "results", title: str | None = None) -> dict:
        """Write ``{stem}.json``, ``{stem}.md`` and ``heatmap.png`` (``{stem}_heatmap.png`` if stem differs)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md",
                 "png": out / ("heatmap.png" if stem == "results" else f"{stem}_heatmap.png")}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2))
        paths["md"].write_text(self.markdown())
        self.heatmap(paths["png"], title)
        return {k: str(v) for k, v in paths.items()}


def sweep(model, tokenizer, records: Sequence[Mapping], rows: Sequence, cols: Sequence,
          plan_fn: Callable[[object, object], SteeringPlan], *, method: str = "austeer", row_name: str = "k",
          col_name: str = "alpha", backend: str = "torch", batch_size: int = 8, eval_method: str = "logprob",
          vanilla=True, log: Callable[[str], None] | None = None, template: str | None = None,
          max_new_tokens: int = 1) -> SweepResult:
    """Validation accuracy of ``plan_fn(row, col)`` for every grid cell.

    One attach per row value (the plan's sites depend on it) and ``handle.update()`` for each column value
    (same sites, new values in place). ``backend`` must support update() (``torch``, ``triton``,
    ``reference``; not ``fold``). Non-finite scores count as wrong in the harness, so a strength that
    blows the model up shows as low accuracy rather than an error. ``eval_method`` "generate" scores the
    greedy answer under ``template`` with ``max_new_tokens`` (the official protocol; non-answers per cell in
    ``non_answers``). ``vanilla``: True evaluates the unsteered model too, False skips it, or pass its
    EvalResult on the same records to reuse it.
    """
    from ..evaluate.tasks import evaluate, task_kind
    from ..runtime.attach import attach

    if not rows or not cols:
        raise AUSteerError("sweep needs at least one row value and one column value")
    if backend == "fold":
        raise AUSteerError("sweep needs a backend whose values can be updated in place (torch, triton, "
                           "reference); 'fold' bakes them into the weights")
    kind = task_kind(records)
    t0 = time.perf_counter()
    ev = lambda: evaluate(model, tokenizer, records, kind, batch_size=batch_size, method=eval_method,
                          progress=False, template=template, max_new_tokens=max_new_tokens)
    if vanilla is True:
        van = ev()
    elif vanilla is False or vanilla is None:
        van = None
    elif hasattr(vanilla, "accuracy") and hasattr(vanilla, "correct"):
        van = vanilla  # an EvalResult of the unsteered model on the same records
    else:
        raise AUSteerError("vanilla must be True, False or the EvalResult of the unsteered model on these records")
    if log and van is not None:
        log(f"{method}: vanilla {van.accuracy:.3f}")
    acc = [[None] * len(cols) for _ in rows]
    cor = [[None] * len(cols) for _ in rows]
    nona = [[None] * len(cols) for _ in rows]
    n = len(records)
    for i, r in enumerate(rows):
        handle = None
        try:
            for j, c in enumerate(cols):
                plan = plan_fn(r, c)
                if handle is None:
                    handle = attach(model, plan, backend=backend, check_finite=False)
                else:
                    handle.update(plan)
                res = ev()
                acc[i][j], cor[i][j], nona[i][j] = res.accuracy, res.correct, res.non_answers
                if log:
                    log(f"{method}: {row_name}={r} {col_name}={c}: {res.accuracy:.3f}")
        finally:
            if handle is not None:
                handle.detach()
    gen = eval_method == "generate"
    return SweepResult(method, row_name, col_name, list(rows), list(cols), acc, cor, n,
                       None if van is None else van.accuracy, None if van is None else van.correct,
                       time.perf_counter() - t0, non_answers=nona if gen else None,
                       vanilla_non_answers=None if van is None or not gen else van.non_answers)
