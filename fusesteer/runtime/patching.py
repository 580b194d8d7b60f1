"""Reversible patching of module forwards and hooks.

Detach restores the exact original state: a forward that lived on the class is removed from the instance
dict again, one that lived on the instance (e.g. an accelerate hook wrapper) is put back as it was.
"""

from __future__ import annotations

import torch.nn as nn


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

    def restore(self) -> None:
        errors = []
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
        if errors:
            raise errors[0]
