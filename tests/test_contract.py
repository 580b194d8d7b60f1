"""The contract check at attach: patched layer forwards must reproduce the HF layer they replace."""

import copy

import pytest
import torch
from conftest import FAMILIES, patched_forward, random_plan

import fusesteer as fs
from fusesteer.runtime.compat import TRANSFORMERS_VERSION


def _broken_copy(model, forward):
    """A deep copy of the model whose decoder layers are of a new subclass with another forward."""
    m = copy.deepcopy(model)
    base = type(m.model.layers[0])
    broken = type("Broken" + base.__name__, (base,), {"forward": forward})
    for layer in m.model.layers:
        fn = layer.__dict__.get("forward")  # transformers 5.0 leaves the bound class forward on the instance
        if fn is not None and getattr(fn, "__func__", None) is base.forward:
            del layer.__dict__["forward"]
        layer.__class__ = broken
    return m, base


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
def test_changed_layer_computation_is_refused(tiny_models, backend):
    """triton re-runs the layer skeleton in its kernels, so a layer computing something else is refused; torch
    (and auto on CPU) wrap the layer's own forward, so they follow the change and equal the reference hooks."""
    model = tiny_models("llama")

    def forward(self, hidden_states, **kwargs):  # a residual multiplier the llama adapter does not know
        return 0.5 * type(self).__mro__[1].forward(self, hidden_states, **kwargs)

    m, base = _broken_copy(model, forward)
    plan = random_plan(m, ["layer.out", "mlp.down_proj.in"], seed=1)
    fused = "triton" if backend == "triton" or (backend == "auto" and torch.cuda.is_available()) else "torch"
    if fused == "torch":
        ids = torch.tensor([[1, 2, 3, 4]])
        with fs.attach(m, plan, backend="reference"), torch.no_grad():
            want = m(ids).logits
        with fs.attach(m, plan, backend=backend), torch.no_grad():
            got = m(ids).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        return
    with pytest.raises(fs.AttachError) as e:
        fs.attach(m, plan, backend=backend)
    msg = str(e.value)
    assert f"Broken{base.__name__}" in msg and "'llama'" in msg and TRANSFORMERS_VERSION in msg
    assert "identity maps" in msg
    assert not hasattr(m, "_fusesteer_handle") and patched_forward(m.model.layers[0]) is None
    with fs.attach(m, plan, backend="reference"):  # hooks do not re-run the skeleton: still allowed
        pass


def test_positions_not_passed_is_refused(tiny_models):
    model = tiny_models("qwen3")

    m, _ = _broken_copy(model, lambda self, hidden_states, **kw: type(self).__mro__[1].forward(
        self, hidden_states, **kw))
    orig_call = type(m.model.layers[0]).__call__

    def call(self, *args, **kwargs):  # a stack that stopped handing token positions to its layers
        kwargs.pop("position_ids", None)
        kwargs.pop("cache_position", None)
        return orig_call(self, *args, **kwargs)
    type(m.model.layers[0]).__call__ = call
    with pytest.raises(fs.AttachError, match="no position_ids"):
        fs.attach(m, random_plan(m, ["layer.out"], seed=1, gating="generated"), backend="torch")


@pytest.mark.parametrize("family", FAMILIES)
def test_contract_runs_once_per_layer_class(tiny_models, family):
    from fusesteer.runtime import contract

    model = tiny_models(family)
    plan = random_plan(model, ["layer.out", "mlp.down_proj.in"], seed=1)
    contract._VERIFIED.clear()
    with fs.attach(model, plan, backend="torch") as h:
        assert h.contract_ms > 0
    with fs.attach(model, plan, backend="torch") as h:
        assert h.contract_ms == 0  # verified already in this process
    with fs.attach(model, plan, backend="torch", verify=False) as h:
        assert h.contract_ms is None
    assert any(k[0] == "torch" and family in k for k in contract._VERIFIED)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # the probe left the model as it was
