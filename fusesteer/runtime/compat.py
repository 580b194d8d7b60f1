"""The few facts fusesteer needs from transformers' calling conventions, found at run time.

transformers renames keywords between releases (5.24 calls the KV cache ``cache``; earlier 5.x releases call it
``past_key_values``, still accepted with a FutureWarning until 5.40). fusesteer never branches on a version
number: it reads the signature of the forward it is about to call, and the field of the output it reads.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import transformers

# re-exported for the server's preallocated KV cache (serve/kv.py): a cache (model code calls its
# ``update(k, v, layer_idx, ...)``) and the per-layer base, both public from 5.0 on
from transformers.cache_utils import Cache, CacheLayerMixin  # noqa: F401

TRANSFORMERS_VERSION = transformers.__version__
CACHE_KEYWORDS = ("cache", "past_key_values")
POSITION_KEYWORDS = ("position_ids", "cache_position")


@lru_cache(maxsize=64)
def _forward_params(cls) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return ()


def cache_keyword(model) -> str:
    """The keyword under which ``model.forward`` takes the KV cache (``cache`` or ``past_key_values``)."""
    params = _forward_params(type(model))
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    return CACHE_KEYWORDS[-1]


def with_cache(model, cache, **kwargs) -> dict:
    """Forward keyword arguments with the KV cache passed under the keyword this model's forward declares."""
    kwargs[cache_keyword(model)] = cache
    return kwargs


def output_cache(out):
    """The KV cache returned by a forward (``out.cache`` or ``out.past_key_values``, whichever is a field)."""
    for name in CACHE_KEYWORDS:
        if name in out:
            return out[name]
    return None


_RETURNS_TUPLE: dict[type, bool] = {}


def observe_layer_output(cls, out) -> None:
    """Record what a decoder layer class's forward really returned (a tuple or the hidden states tensor)."""
    _RETURNS_TUPLE[cls] = isinstance(out, tuple)


def layer_returns_tuple(cls) -> bool | None:
    """Whether a decoder layer class's forward returns a tuple ``(hidden_states, ...)`` (older 5.x releases of
    some families, e.g. Granite in 5.0) rather than the hidden states tensor, as observed by
    :func:`observe_layer_output`; None when not observed yet. (Return annotations are not trusted: in 5.0
    Gemma 3's says tuple and it returns a tensor.)"""
    return _RETURNS_TUPLE.get(cls)


def positional_names(fn) -> list[str]:
    """Names of the positional parameters of a layer forward after ``hidden_states``."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if names and names[0] == "self":
        names = names[1:]
    return names[1:]


def merged_kwargs(names, args, kwargs) -> dict:
    """A layer call's extra positional arguments folded into its keywords (by the forward's signature)."""
    if args:
        kwargs = dict(kwargs)
        kwargs.update(zip(names, args))
    return kwargs


def layer_positions(kwargs):
    """The token positions a decoder layer receives (``position_ids``; ``cache_position`` as a fallback)."""
    for key in POSITION_KEYWORDS:
        t = kwargs.get(key)
        if t is not None:
            return t
    return None


def tensor_parallel_kwargs(plan: str = "auto") -> dict:
    """``from_pretrained`` keywords for transformers' tensor parallelism with ``plan``: a ``DistributedConfig``
    where this transformers has one that takes a ``tp_plan`` (newer releases deprecate the bare keyword), else
    ``tp_plan=`` (5.0)."""
    try:
        from transformers import DistributedConfig
    except ImportError:
        return {"tp_plan": plan}
    if "tp_plan" not in inspect.signature(DistributedConfig).parameters:
        return {"tp_plan": plan}
    return {"distributed_config": DistributedConfig(tp_plan=plan)}
