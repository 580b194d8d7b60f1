"""A short probe of the decoder stack: the inputs each layer receives, and what each kind of layer returns.

Used by the layer contract check (:mod:`.contract`) and by the fused backends, which return what the HF layer
they replace returns (a tuple or a tensor, depending on the transformers release).
"""

from __future__ import annotations

import torch

from .compat import layer_returns_tuple, observe_layer_output

PROBE_TOKENS = 5


def first_of_each_class(layers) -> dict[int, type]:
    """The first layer of each kind: its class and its MLP's class (Qwen3-MoE mixes dense and sparse layers of
    one class)."""
    seen: dict[tuple, int] = {}
    for i, layer in enumerate(layers):
        seen.setdefault((type(layer), type(getattr(layer, "mlp", None))), i)
    return {i: kind[0] for kind, i in seen.items()}


def capture_layer_calls(parts, wanted: list[int], device) -> dict[int, tuple]:
    """(args, kwargs) of the wanted layers' calls on a short probe of the decoder stack."""
    got: dict[int, tuple] = {}
    handles = []

    def make(i):
        def pre(mod, args, kwargs):
            got[i] = (args, dict(kwargs))
        return pre
    for i in wanted:
        handles.append(parts.layers[i].register_forward_pre_hook(make(i), with_kwargs=True))
    vocab = parts.model.get_input_embeddings().weight.shape[0]
    ids = (torch.arange(1, PROBE_TOKENS + 1, device=device) % vocab).unsqueeze(0)
    layers = parts.base.layers
    try:
        # only the layers up to the last one needed run: the stack is given a shorter list for this call
        # (restored below), not stopped half way by an exception through transformers' code
        parts.base.layers = torch.nn.ModuleList(list(layers)[: max(wanted) + 1])
        with torch.no_grad():
            parts.base(input_ids=ids, use_cache=False)
    finally:
        parts.base.layers = layers
        for h in handles:
            h.remove()
    return got


def observe_conventions(parts) -> None:
    """Run the HF forward of the first layer of each kind once on a short probe (no cache) and record whether it
    returns a tuple or a tensor (:func:`~.compat.observe_layer_output`), for the classes not observed yet.
    The fused skeleton returns what the layer it replaces returns."""
    todo = {i: cls for i, cls in first_of_each_class(parts.layers).items() if layer_returns_tuple(cls) is None}
    if not todo:
        return
    device = parts.model.get_input_embeddings().weight.device
    captured = capture_layer_calls(parts, sorted(todo), device)
    for i, cls in todo.items():
        if i in captured:
            args, kwargs = captured[i]
            with torch.no_grad():
                observe_layer_output(cls, parts.layers[i](*args, **kwargs))
