"""The `auto` backend: fold what folds into the weights, run the rest on the fused path.

Per (layer, site) of a single attached plan, :func:`fold_reasons` decides whether the map folds (see
:mod:`.fold`); those maps go into the weights, the others run through the fused backend (``triton`` when
the model is on CUDA and the Triton backend imports, else ``torch``), which is installed over just the
remaining tables. Several plans (per-row routing) always run fully fused. One info line on the
``fusesteer`` logger says what went where; ``handle.report`` holds the split.

When anything was folded the attachment is *static*: ``handle.update()`` refuses (values live in the
weights; detach and attach again) and so does routing rows to no plan.
"""

from __future__ import annotations

import logging

import torch

from .fold import apply_folds, entry_count, fold_reasons, model_bytes

log = logging.getLogger("fusesteer")


class _SubsetHandle:
    """The handle as seen by the fused backend: everything forwarded, but only the tables it runs."""

    def __init__(self, handle, tables: dict):
        object.__setattr__(self, "_handle", handle)
        object.__setattr__(self, "tables", tables)

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_handle"), name)


def _fused_backend(handle):
    dev = next((p.device for p in handle.model.parameters()), torch.device("cpu"))
    if dev.type == "cuda":
        try:
            from .triton import TritonBackend
            return "triton", TritonBackend()
        except ImportError:
            pass
    from .fused import TorchBackend
    return "torch", TorchBackend()


def _sites(keys) -> str:
    order = ("attn.o_proj.in", "mlp.down_proj.in", "mlp.out", "layer.out")
    used = {k[1] for k in keys}
    return ", ".join(s for s in order if s in used)


class AutoBackend:
    name = "auto"

    def __init__(self):
        self.static = False  # becomes True once something is folded (update() then refuses)
        self.fused = None
        self.fused_name = None
        self._sub = None

    def install(self, handle) -> None:
        reasons = fold_reasons(handle)
        fold_keys = [k for k, r in reasons.items() if r is None]
        fused_keys = [k for k, r in reasons.items() if r is not None]
        res = apply_folds(handle, fold_keys) if fold_keys else None
        self.static = bool(fold_keys)
        if fused_keys:
            self.fused_name, self.fused = _fused_backend(handle)
            self._sub = _SubsetHandle(handle, {k: handle.tables[k] for k in fused_keys})
            self.fused.install(self._sub)
        why: dict[str, int] = {}
        for k in fused_keys:
            why[reasons[k].tag] = why.get(reasons[k].tag, 0) + 1
        handle.report = {
            "backend": "auto",
            "folded": [list(k) for k in sorted(fold_keys)],
            "fused": [{"layer": k[0], "site": k[1], "reason": reasons[k].text} for k in sorted(fused_keys)],
            "fused_backend": self.fused_name,
            "fused_reasons": why,
            "folded_entries": entry_count(handle, fold_keys),
            "fused_entries": entry_count(handle, fused_keys),
            "model_bytes": model_bytes(handle.model),
        }
        if res is not None:
            handle.report.update({k: v for k, v in res.as_dict().items() if k != "folded"})
        else:
            handle.report.update(modules=[], created_biases=[], restore_bytes=0, restore_slice_bytes=0,
                                 restore_bias_bytes=0, restore_index_bytes=0)
        log.info("%s", self.summary(handle))

    def summary(self, handle) -> str:
        r = handle.report
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

    def on_update(self, handle) -> None:
        if self.fused is not None and hasattr(self.fused, "on_update"):
            self.fused.on_update(self._sub)
