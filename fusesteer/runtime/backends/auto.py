"""The `auto` backend: fold what folds into the weights, run the rest on the fused path.

Per (layer, site) of a single attached plan, :func:`.fold.fold_reasons` decides whether the map folds (see
:mod:`.fold`); those maps go into the weights, the others run through the fused backend (``triton`` when
the model is on CUDA and the Triton backend imports, else ``torch``), installed over just the remaining
tables. Several plans (per-row routing) always run fully fused. One info line on the ``fusesteer`` logger
says what went where; ``handle.report`` holds the split.

Everything auto changes goes through its own :class:`~..patching.Patcher`, restored by one undo on the
handle's patcher, so it can re-plan while attached:

* ``handle.update(plan)``, ``add_plan()``, ``remove_plan()``: new values are refolded (folded weights restored
  bit-exactly, then folded again from the updated tables) and the fused part re-installed; costs
  milliseconds, no recompiles. If the refold is refused (non-finite folded weights), the handle puts the
  previous tables back and calls this again, so the previous values (and their report) are in place.
* ``handle.route([...])`` with unsteered rows (or ``route_all(None)``): folded weights would steer every
  row, so the folded maps move to the fused path for the rest of the attachment (logged).
"""

from __future__ import annotations

import logging

from ..patching import Patcher
from ..sites import in_layer_order
from .base import Backend, InstallContext
from .fold import Refusal, apply_folds, entry_count, fold_reasons, model_bytes

log = logging.getLogger("fusesteer")


def _sites(keys) -> str:
    return ", ".join(in_layer_order({k[1] for k in keys}))


_ROUTED = Refusal("per-row routing", "handle.route() asked for unsteered rows, and folded weights steer every "
                                     "row", "")


class AutoBackend(Backend):
    name = "auto"
    static = False  # update() works: values are refolded

    @staticmethod
    def support(family) -> str:
        return "= `reference`" if family.generic else "fold what folds, the rest on `triton` (CUDA) / `torch`"

    def __init__(self, fused_backend):
        self._fused_backend = fused_backend  # handle -> (name, backend object) of the fused path
        self.fold_allowed = True  # False once routing asked for unsteered rows
        self.fused = None
        self.fused_name = None
        self.result = None
        self._sub = None
        self._patcher = Patcher()

    # ---- lifecycle ---------------------------------------------------------------------------------
    def check(self, handle) -> None:
        self._fused_backend(handle)[1].check(handle)  # what the fused part would refuse, before the contract probe

    def install(self, ctx) -> None:
        handle = ctx.handle
        handle.patcher.add_undo(self._restore)  # first: a failure below, or detach, restores all of it
        self._install(handle, logging.INFO)

    def _restore(self) -> None:
        self.fused = self._sub = self.result = None
        self._patcher.restore()  # a step that fails stays in it, for the handle's next detach()

    def _install(self, handle, level: int) -> None:
        reasons = fold_reasons(handle)
        if not self.fold_allowed:
            reasons = {k: (r if r is not None else _ROUTED) for k, r in reasons.items()}
        fold_keys = [k for k, r in reasons.items() if r is None]
        fused_keys = [k for k, r in reasons.items() if r is not None]
        self.result = apply_folds(handle, fold_keys, patcher=self._patcher) if fold_keys else None
        if fused_keys:
            self.fused_name, self.fused = self._fused_backend(handle)
            self._sub = InstallContext(handle, {k: handle.tables[k] for k in fused_keys}, self._patcher)
            self.fused.install(self._sub)
        else:
            self.fused_name = None
        why: dict[str, int] = {}
        for k in fused_keys:
            why[reasons[k].tag] = why.get(reasons[k].tag, 0) + 1
        report = {
            "backend": "auto",
            "folded": [list(k) for k in sorted(fold_keys)],
            "fused": [{"layer": k[0], "site": k[1], "reason": reasons[k].text} for k in sorted(fused_keys)],
            "fused_backend": self.fused_name,
            "fused_reasons": why,
            "folded_entries": entry_count(handle, fold_keys),
            "fused_entries": entry_count(handle, fused_keys),
            "model_bytes": model_bytes(handle.model),
            "modules": [], "created_biases": [], "restore_bytes": 0, "restore_slice_bytes": 0,
            "restore_bias_bytes": 0, "restore_index_bytes": 0,
        }
        if self.result is not None:
            report.update({k: v for k, v in self.result.as_dict().items() if k != "folded"})
        handle.report = report
        log.log(level, "%s", self.summary(report))

    @staticmethod
    def summary(r: dict) -> str:
        folded_keys = [tuple(k) for k in r["folded"]]
        fused_keys = [(d["layer"], d["site"]) for d in r["fused"]]
        if folded_keys:
            part1 = (f"auto: folded {r['folded_entries']} entries ({_sites(folded_keys)}) into "
                     f"{len(r['modules'])} weights")
        else:
            part1 = "auto: folded 0 entries"
        if fused_keys:
            reasons = ", ".join(f"{tag}: {n}" for tag, n in sorted(r["fused_reasons"].items()))
            part2 = (f"fused {r['fused_entries']} entries ({_sites(fused_keys)}; why not folded: {reasons}) "
                     f"via {r['fused_backend']}")
        else:
            part2 = "nothing left to fuse (no patched forwards)"
        return f"{part1}; {part2}"

    def holds_weights(self) -> bool:
        return self.result is not None and bool(self.result.modules)

    # ---- re-planning while attached ----------------------------------------------------------------
    def _reinstall(self, handle, level: int) -> None:
        self._restore()
        self._install(handle, level)

    def on_update(self, handle) -> None:
        """Values (or the set of plans) changed in handle.tables: refold from them, re-install the fused part."""
        self._reinstall(handle, logging.DEBUG)

    def on_route(self, handle, ids) -> None:
        """Folded weights steer every row with plan 1: any other routing (unsteered rows, another plan) moves
        the folded maps to the fused path."""
        if self.fold_allowed and any(i != 1 for i in ids) and self.result is not None and self.result.modules:
            self.fold_allowed = False
            self._reinstall(handle, logging.INFO)
