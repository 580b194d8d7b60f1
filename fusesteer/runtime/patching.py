"""Reversible patching of module forwards and hooks.

Detach restores the exact original state: a forward that lived on the class is removed from the instance
dict again, one that lived on the instance (e.g. an accelerate hook wrapper) is put back as it was. An undo
step that fails stays registered (the others still run), so a later ``restore()`` can retry it.
"""

from __future__ import annotations

import torch.nn as nn


def foreign_forward(module: nn.Module, skipped: bool) -> str | None:
    """What another library installed on ``module``'s forward path that a backend would bypass, or None.

    ``skipped=False``: the backend replaces the module's forward but still goes through ``module(...)``, so
    hooks run and accelerate's wrapper is kept (its ``_old_forward`` is what gets patched); only another
    instance-level ``forward`` is lost. ``skipped=True``: the module is never called (its computation is
    fused into a neighbour), so any instance-level forward and any forward (pre-)hook would be bypassed."""
    fn = module.__dict__.get("forward")
    accelerate = hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__
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
