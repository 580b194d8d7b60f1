"""Reversible patching of module forwards and hooks.

Detach restores the exact original state: a forward that lived on the class is removed from the instance
dict again, one that lived on the instance (e.g. an accelerate hook wrapper) is put back as it was. An undo
step that fails stays registered (the others still run), so a later ``restore()`` can retry it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import AttachError
from .tp import own_parallel_forward


def foreign_forward(module: nn.Module, skipped: bool) -> str | None:
    """What another library installed on ``module``'s forward path that a backend would bypass, or None.

    ``skipped=False``: the backend replaces the module's forward but still goes through ``module(...)``, so
    hooks run and accelerate's wrapper is kept (its ``_old_forward`` is what gets patched); only another
    instance-level ``forward`` is lost. ``skipped=True``: the module is never called (its computation is
    fused into a neighbour), so any instance-level forward and any forward (pre-)hook would be bypassed."""
    fn = module.__dict__.get("forward")
    accelerate = hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__
    if fn is not None and not skipped and own_parallel_forward(module):
        fn = None  # transformers' tensor-parallel wrapper (the module's own weights are DTensors): wrapped, kept
    if fn is not None and (skipped or not accelerate) and not (
            getattr(fn, "__self__", None) is module and getattr(fn, "__func__", None) is type(module).forward):
        what = "accelerate's hook wrapper" if accelerate else f"{type(fn).__name__} {_name(fn)}"
        return f"an instance-level forward ({what})"
    n = len(module._forward_hooks) + len(module._forward_pre_hooks) if skipped else 0
    if n:
        return f"{n} forward hook{'s' if n > 1 else ''}"
    return None


def foreign_hooks(module: nn.Module, kind: str) -> str | None:
    """The forward hooks (``kind="output"``: forward hooks, global ones included) or forward pre-hooks
    (``kind="input"``) another library put on ``module``, named for an error message; None if there are none."""
    from torch.nn.modules import module as _m

    if own_parallel_forward(module):
        return None  # transformers' tensor-parallel layout hooks (the module's own weights are DTensors)
    if kind == "output":
        hooks = list(_m._global_forward_hooks.values()) + list(module._forward_hooks.values())
    else:
        hooks = list(_m._global_forward_pre_hooks.values()) + list(module._forward_pre_hooks.values())
    if not hooks:
        return None
    what = "forward hook" if kind == "output" else "forward pre-hook"
    return f"{len(hooks)} {what}{'s' if len(hooks) > 1 else ''} ({', '.join(_name(h) for h in hooks[:3])})"


def _name(fn) -> str:
    f = getattr(fn, "func", fn)  # functools.partial
    return repr(getattr(f, "__qualname__", getattr(f, "__name__", "?")))


def forward_attr(module: nn.Module) -> str:
    """Attribute to patch: accelerate's hooks route module.forward through module._old_forward."""
    if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__:
        return "_old_forward"
    return "forward"


class Patcher:
    def __init__(self):
        self._undo: list = []

    def original_forward(self, module: nn.Module):
        return getattr(module, forward_attr(module))

    def set_forward(self, module: nn.Module, fn) -> None:
        attr = forward_attr(module)
        had = attr in module.__dict__
        old = module.__dict__.get(attr)
        self._undo.append(("fwd", module, attr, had, old))
        setattr(module, attr, fn)

    def set_attr(self, obj, name: str, value) -> None:
        had = name in obj.__dict__
        old = obj.__dict__.get(name)
        self._undo.append(("attr", obj, name, had, old))
        obj.__dict__[name] = value

    def add_hook(self, hook_handle) -> None:
        self._undo.append(("hook", hook_handle))

    def add_undo(self, fn) -> None:
        self._undo.append(("fn", fn))

    @property
    def pending(self) -> bool:
        """Undo steps are still registered (nothing was patched yet, or a restore failed part-way)."""
        return bool(self._undo)

    def restore(self) -> None:
        """Undo everything, newest first. Steps that raise are kept (in order) for another restore(); the
        first error is re-raised once the others have run."""
        errors, failed = [], []
        while self._undo:
            item = self._undo.pop()
            try:
                if item[0] == "hook":
                    item[1].remove()
                elif item[0] == "fn":
                    item[1]()
                else:
                    _, obj, attr, had, old = item
                    if had:
                        obj.__dict__[attr] = old
                    else:
                        obj.__dict__.pop(attr, None)
            except Exception as e:  # noqa: BLE001 - keep restoring the rest, re-raise at the end
                errors.append(e)
                failed.append(item)
        self._undo = failed[::-1]
        if errors:
            raise errors[0]


# ---- what may not happen to a model while a plan is attached ------------------------------------------
def move_problem(module, fn) -> str | None:
    """What ``module._apply(fn)`` (model.to / .half / .cuda ...) would change: a dtype or a device, or None."""
    seen = set()
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.dtype, t.device)
        if key in seen:
            continue
        seen.add(key)
        try:
            out = fn(torch.empty(0, dtype=t.dtype, device=t.device))
        except Exception:  # noqa: BLE001 - the move itself will raise the same error
            return None
        if isinstance(out, torch.Tensor) and (out.dtype, out.device) != key:
            return f"{t.dtype} on {t.device} -> {out.dtype} on {out.device}"
    return None


def guard_model(patcher: Patcher, model: nn.Module, live, holds_weights, backend: str) -> None:
    """On the model and every module, before anything changes: refuse ``_apply`` moves (model.to(dtype/device),
    .half(), .cuda(), ...) while ``live()`` — the plan tables, the routing state and fold's restore data stay
    where they were made — and ``load_state_dict`` while ``live() and holds_weights()`` — detach would put the
    pre-attach weights back over what was loaded. Both are undone by ``patcher``."""
    for mod in model.modules():
        orig_apply, orig_load = mod._apply, mod.load_state_dict

        def guarded_apply(fn, *args, _mod=mod, _orig=orig_apply, **kwargs):
            if live():
                what = move_problem(_mod, fn)
                if what is not None:
                    raise AttachError(
                        f"cannot move {type(_mod).__name__} ({what}) while a fusesteer plan is attached: "
                        f"nothing was changed. Detach first (handle.detach() or leave the with block), move "
                        f"the model, then attach again")
            return _orig(fn, *args, **kwargs)

        def guarded_load(*args, _mod=mod, _orig=orig_load, **kwargs):
            if live() and holds_weights():
                raise AttachError(
                    f"cannot load a state dict into {type(_mod).__name__} while a fusesteer plan is folded into "
                    f"the model's weights (backend {backend!r}): nothing was loaded. Detach first "
                    f"(handle.detach() or leave the with block), load, then attach again")
            return _orig(*args, **kwargs)
        patcher.set_attr(mod, "_apply", guarded_apply)
        patcher.set_attr(mod, "load_state_dict", guarded_load)
