"""The site registry: one record per steerable activation of a decoder layer.

Everything that needs to know where a site is reads it here: its width (which model-shape field), the HF module
it lives at (``path`` inside the decoder layer; an input site is that module's input, an output site its
output), its place in the layer's computation (``order``, the order maps compose and fold in), and the linear
it folds into. Adding a site is one record here plus, for the fused backends, where their layer skeleton
applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PlanError


@dataclass(frozen=True)
class Site:
    name: str
    order: int  # position in the layer's computation
    width: str  # the ModelSpec field that gives its width
    where: str  # "input" (of the module at path) or "output"
    path: str  # module inside a decoder layer ("" = the layer itself)
    fold_linear: str  # the linear a static map folds into
    # how: "columns" (scale the linear's input columns, W b into its bias), "rows+bias" (scale its output rows
    # and bias, bias += b), "bias" (a = 1 only: bias += b, after the rows+bias site of the same linear)
    fold: str
    # the modules a folded map moves across, from the site to the linear: (path in the layer, whether that
    # module's output hooks would see the map's other side: the site's own module's do not, since an output
    # map runs before its module's forward hooks on every backend); another library's forward wrapper there, or
    # output hooks where flagged, keeps the map from folding
    fold_across: tuple = ()


_RECORDS = (
    Site("attn.o_proj.in", 0, "attn_width", "input", "self_attn.o_proj", "self_attn.o_proj", "columns",
         (("self_attn.o_proj", False),)),
    Site("mlp.down_proj.in", 1, "intermediate_size", "input", "mlp.down_proj", "mlp.down_proj", "columns",
         (("mlp.down_proj", False),)),
    Site("mlp.out", 2, "hidden_size", "output", "mlp", "mlp.down_proj", "rows+bias",
         (("mlp.down_proj", True), ("mlp", False))),
    Site("layer.out", 3, "hidden_size", "output", "", "mlp.down_proj", "bias",
         (("mlp.down_proj", True), ("mlp", True), ("", False))),
)
REGISTRY = {s.name: s for s in _RECORDS}
#: site names in the order the docs list them
SITES = ("layer.out", "attn.o_proj.in", "mlp.down_proj.in", "mlp.out")
assert set(SITES) == set(REGISTRY)


def site(name: str) -> Site:
    rec = REGISTRY.get(name) if isinstance(name, str) else None
    if rec is None:
        raise PlanError(f"unknown site {name!r}; expected one of {', '.join(SITES)}")
    return rec


def in_layer_order(names) -> list[str]:
    return sorted(names, key=lambda n: site(n).order)


def module_at(layer, path: str):
    mod = layer
    for part in filter(None, path.split(".")):
        mod = getattr(mod, part)
    return mod


def hook_site(layer, name: str, fn, first: bool = False):
    """Register a hook that calls ``fn(x)`` with the site's activation; a tensor it returns replaces x.
    Returns the hook handle.

    ``first``: the hook runs first among the module's forward (pre-)hooks (``prepend``), else last. The reference
    backend's output maps run first: the site is the module's output, so every other forward hook (transformers'
    own output capture, another library's, a capture recorder) sees it as the fused backends produce it, after
    the map. Its input maps run last among the pre-hooks already there, on the input the module's forward
    receives."""
    rec = site(name)
    mod = module_at(layer, rec.path)
    if rec.where == "output":
        def post(m, args, out):
            x = out[0] if isinstance(out, tuple) else out
            y = fn(x)
            if y is None:
                return None
            return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y
        return mod.register_forward_hook(post, prepend=first)

    def pre(m, args, kwargs):
        if args:
            y = fn(args[0])
            return None if y is None else ((y,) + tuple(args[1:]), kwargs)
        y = fn(kwargs["input"])
        if y is None:
            return None
        kwargs = dict(kwargs)
        kwargs["input"] = y
        return args, kwargs
    return mod.register_forward_pre_hook(pre, with_kwargs=True, prepend=first)
