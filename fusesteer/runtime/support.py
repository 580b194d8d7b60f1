"""What fusesteer attaches to, and what each backend does there: read from the backends' own declarations
(``Backend.support(family)``), not restated. ``fs.supported_models()`` returns it as data; the README's matrix is
:func:`support_markdown` (a test keeps the two equal).
"""

from __future__ import annotations

from .backends import BACKENDS
from .families import FAMILIES, Family

GENERIC = Family("generic", ("any other",), ("any *ForCausalLM with model.model.layers[i].self_attn.o_proj and .mlp",),
                 layout="unknown", generic=True, notes="a warning names what is unverified")
_ORDER = ("reference", "torch", "triton", "fold", "auto")
assert set(_ORDER) == set(BACKENDS)


def _backend_classes() -> dict:
    from .backends.auto import AutoBackend
    from .backends.fold import FoldBackend
    from .backends.reference import ReferenceBackend
    from .backends.torch import TorchBackend

    out = {"reference": ReferenceBackend, "torch": TorchBackend, "fold": FoldBackend, "auto": AutoBackend}
    try:
        from .backends.triton import TritonBackend
        out["triton"] = TritonBackend
    except ImportError:  # no Triton installed: the level is what the backend would do (pip install fusesteer[triton])
        out["triton"] = None
    return out


def _level(cls, family) -> str:
    return cls.support(family) if cls is not None else "needs the `triton` extra"


def supported_models() -> list[dict]:
    """Every architecture fusesteer attaches to, and what each backend does on it.

    One dict per family: ``family``, ``model_types``, ``classes``, ``layout``, ``notes`` and ``backends``
    ({backend: level}). The last entry is the generic path (any other decoder with the usual skeleton)."""
    classes = _backend_classes()
    return [{"family": f.name, "model_types": list(f.model_types), "classes": list(f.classes), "layout": f.layout,
             "notes": f.notes, "backends": {b: _level(classes[b], f) for b in _ORDER}, "capture": True}
            for f in (*FAMILIES, GENERIC)]


def support_markdown() -> str:
    """The support matrix as the README's Markdown table."""
    rows = ["| family (model_type) | layout | " + " | ".join(f"`{b}`" for b in _ORDER) + " |",
            "|" + "---|" * (2 + len(_ORDER))]
    for r in supported_models():
        types = ", ".join(f"`{t}`" for t in r["model_types"]) if r["family"] != "generic" else "any other"
        notes = f": {r['notes']}" if r["notes"] else ""
        rows.append(f"| {r['family']} ({types}){notes} | {r['layout']} | "
                    + " | ".join(r["backends"][b] for b in _ORDER) + " |")
    return "\n".join(rows)
