"""Lifecycle fuzz: a hypothesis state machine over attach / route / update / add_plan / remove_plan /
set_prompt_length / generate / detach / model.to / exceptions, on tiny models.

After every step: a detached model's state_dict and outputs equal, bit for bit, those of a twin that never
had anything attached (and went through the same moves); an attached one's outputs equal the ``reference``
backend's on the twin with the plans, routing and prompt length the machine expects (bit for bit for the
``torch`` backend, within fold's rounding for ``fold`` / ``auto``). CI runs a fixed set of >= 500 sequences
(derandomized: conftest loads the "ci" profile when CI=true).
"""

import os
import warnings

import pytest
import torch
from conftest import random_plan
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import fusesteer as fs
from fusesteer.testing import tiny

SEQUENCES = int(os.environ.get("FUSESTEER_LIFECYCLE_SEQUENCES", "500"))
STEPS = 10
STATS = {"sequences": 0, "steps": 0, "checks": 0, "seconds": 0.0}
RULES: dict = {}
FAMILIES = ("llama", "gemma3")  # pre-norm and sandwich-norm layers
# triton only where CUDA is: on CPU it runs under the Triton interpreter, ~1 s a forward (test_lifecycle.py has it)
BACKENDS = ("reference", "torch", "fold", "auto") + (("triton",) if torch.cuda.is_available() else ())
DTYPES = (torch.float32, torch.bfloat16)
_MODELS: dict = {}


class Boom(Exception):
    pass


def _models(family):
    """(model, twin, buffers) per family, built once; every sequence starts from the same fp32 state."""
    if family not in _MODELS:
        m, t = tiny(family, seed=0, num_hidden_layers=2), tiny(family, seed=0, num_hidden_layers=2)
        bufs = {k: v.clone() for k, v in m.state_dict(keep_vars=False).items()}
        bufs.update({f"buffer:{k}": v.clone() for k, v in m.named_buffers()})
        _MODELS[family] = (m, t, bufs)
    return _MODELS[family]


def _reset(model, saved):
    model.to(torch.float32)
    model.load_state_dict({k: v for k, v in saved.items() if not k.startswith("buffer:")})
    for k, b in model.named_buffers():
        b.copy_(saved[f"buffer:{k}"])


def _plan(model, kind, seed, bad=False):
    if kind == "static":  # folds: gains and biases next to the linears
        p = random_plan(model, ["attn.o_proj.in", "mlp.down_proj.in", "mlp.out"], sparse=seed % 2 == 0, seed=seed)
    else:
        gating = ("prompt", "generated", "all")[seed % 3]
        p = random_plan(model, ["layer.out", "mlp.down_proj.in"], seed=seed, gating=gating)
        p.extend(random_plan(model, ["attn.o_proj.in"], seed=seed + 1, gating="all"))
    if bad:  # overflows the activations of any dtype wherever it runs: a*x + b with a = b = 3e38
        for e in p.entries:
            if e.gating == "all":
                e.a, e.b = torch.full_like(e.a, 3e38), torch.full_like(e.b, 3e38)
    return p


def _boom(*args):
    raise Boom()


def _count(name):
    RULES[name] = RULES.get(name, 0) + 1
    if not name.startswith(" "):  # "  ...": an outcome inside a step, not a step
        STATS["steps"] += 1


class Lifecycle(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.h = None
        self.old = None  # the last detached handle

    @initialize(family=st.sampled_from(FAMILIES), first=st.sampled_from(BACKENDS + BACKENDS + (None,)),
                kind=st.sampled_from(["static", "gated", "multi", "multi"]), seed=st.integers(0, 5))
    def start(self, family, first, kind, seed):
        STATS["sequences"] += 1
        self.family = family
        self.model, self.twin, saved = _models(family)
        assert not hasattr(self.model, "_fusesteer_handle"), "a previous sequence left a plan attached"
        _reset(self.model, saved)
        _reset(self.twin, saved)
        self.ids = torch.randint(1, self.model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
        self.dtype = torch.float32
        if first is not None:  # most sequences start attached, so that the steps explore the live handle
            self._attach(first, "static" if first == "fold" else kind, seed)

    def teardown(self):
        if self.h is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                self.h.detach()

    # ---- the expected state ------------------------------------------------------------------------
    def _expect_attached(self, h, backend, plans, kinds, routing, multi):
        self.h, self.backend, self.plans, self.kinds = h, backend, plans, kinds
        self.routing, self.plen, self.multi = routing, None, multi
        self.tainted = False  # a folded weight was written behind the plan: steering there is the user's now

    def _names(self):
        return list(self.plans)

    # ---- rules -------------------------------------------------------------------------------------
    @precondition(lambda self: self.h is None)
    @rule(backend=st.sampled_from(BACKENDS), kind=st.sampled_from(["static", "gated", "multi"]),
          seed=st.integers(0, 5))
    def attach(self, backend, kind, seed):
        _count("attach")
        self._attach(backend, kind, seed)

    def _attach(self, backend, kind, seed):
        m = self.model
        if kind == "multi":
            kinds = {"a": "gated", "b": "static"}
            kw = dict(sites="all", capacity=3)
        else:
            kinds, kw = {"plan": kind}, {}
        plans = {n: _plan(m, k, seed + i) for i, (n, k) in enumerate(kinds.items())}
        if backend == "fold" and kind != "static":
            with pytest.raises(fs.AttachError, match="cannot fold|fold"):
                fs.attach(m, plans, backend=backend, **kw)
            return
        h = fs.attach(m, plans, backend=backend, **kw)
        self._expect_attached(h, backend, plans, kinds, None if kind == "multi" else ("all", "plan"), kind == "multi")

    @precondition(lambda self: self.h is None)
    @rule(backend=st.sampled_from(BACKENDS), seed=st.integers(0, 5), where=st.sampled_from(["body", "forward"]))
    def exception_inside_with(self, backend, seed, where):
        _count("exception_inside_with")
        hook = None
        if where == "forward":
            hook = self.model.model.layers[seed % 2].register_forward_hook(_boom)
        try:
            with pytest.raises(Boom):
                with fs.attach(self.model, _plan(self.model, "static", seed), backend=backend), torch.no_grad():
                    self.model(self.ids)
                    raise Boom()
        finally:
            if hook is not None:
                hook.remove()

    @precondition(lambda self: self.h is not None)
    @rule(layer=st.integers(0, 1))
    def exception_in_forward(self, layer):
        _count("exception_in_forward")
        hook = self.model.model.layers[layer].register_forward_hook(_boom)
        try:
            with pytest.raises((Boom, fs.AttachError)), torch.no_grad():
                self.model(self.ids)
        finally:
            hook.remove()

    @precondition(lambda self: self.h is not None)
    @rule(data=st.data())
    def route(self, data):
        _count("route")
        rows = data.draw(st.lists(st.sampled_from(self._names() + [None]), min_size=2, max_size=2))
        if self.backend == "fold" and None in rows:
            with pytest.raises(fs.AttachError, match="unsteered rows"):
                self.h.route(rows)
            return
        self.h.route(rows)
        self.routing = ("rows", rows)

    @precondition(lambda self: self.h is not None)
    @rule(data=st.data())
    def route_all(self, data):
        _count("route_all")
        name = data.draw(st.sampled_from(self._names() + [None]))
        if self.backend == "fold" and name is None:
            with pytest.raises(fs.AttachError, match="unsteered rows"):
                self.h.route_all(name)
            return
        self.h.route_all(name)
        self.routing = ("all", name)

    @precondition(lambda self: self.h is not None and self.multi)
    @rule(data=st.data(), plen=st.integers(0, 6))
    def route_tokens(self, data, plen):
        """Per-row plan ids as a [2, 1] tensor (names kept: ids are reused after remove_plan/add_plan)."""
        _count("route_tokens")
        rows = data.draw(st.lists(st.sampled_from(self._names() + [None]), min_size=2, max_size=2))
        pids = torch.tensor([[self.h.plan_id(r)] for r in rows])
        self.h.route_tokens(pids, torch.full((2, 1), plen))
        self.routing = ("tokens", rows, plen)

    @precondition(lambda self: self.h is not None and self.routing is not None and self.routing[0] == "all"
                  and not isinstance(self.plen, list) and not self.tainted)
    @rule()
    def big_batch(self):
        """70 copies of row 0: more rows than the routing tensors start with; every row runs like row 0."""
        _count("big_batch")
        big = self.ids[:1].expand(70, -1).contiguous()
        with torch.no_grad():
            got = self.model(big).logits
        assert torch.equal(got, got[:1].expand_as(got)), "a row past 64 was routed or gated differently"

    @precondition(lambda self: self.h is not None)
    @rule(how=st.sampled_from(["load_state_dict", "copy_", "data_copy_", "data", "set_"]))
    def write_weight(self, how):
        """Write new values into layer 0's down_proj (model and twin alike) while attached: load_state_dict is
        refused while something is folded (nothing loaded); other writes go through, and a folded weight keeps
        what was written at detach (the twin has it too)."""
        lin, twin_lin = self.model.model.layers[0].mlp.down_proj, self.twin.model.layers[0].mlp.down_proj
        new = twin_lin.weight.detach().clone() * 1.01 + 1e-3
        folded = self.h.backend.holds_weights()
        if how == "load_state_dict" and folded:
            before = lin.weight.detach().clone()
            with pytest.raises(fs.AttachError, match="nothing was loaded"):
                lin.load_state_dict({"weight": new.to(lin.weight.dtype)})
            assert torch.equal(lin.weight, before)
            _count("  load_state_dict refused while folded")
            return
        _count(f"write_weight {how}")
        folded_here = folded and any(m["name"] == "model.layers.0.mlp.down_proj"
                                     for m in self.h.report.get("modules", []))
        new = new.to(lin.weight.dtype)
        with torch.no_grad():
            if how == "load_state_dict":
                lin.load_state_dict({"weight": new} | ({"bias": lin.bias} if lin.bias is not None else {}))
            elif how == "copy_":
                lin.weight.copy_(new)
            elif how == "data_copy_":
                lin.weight.data.copy_(new)
            elif how == "data":
                lin.weight.data = new.clone()
            else:
                lin.weight.set_(new.clone())
            twin_lin.weight.copy_(new)
        self.tainted = self.tainted or folded_here

    @precondition(lambda self: self.h is not None)
    @rule(n=st.one_of(st.none(), st.integers(0, 6), st.lists(st.integers(0, 6), min_size=2, max_size=2)))
    def set_prompt_length(self, n):
        _count("set_prompt_length")
        self.h.set_prompt_length(n)
        self.plen = n

    @precondition(lambda self: self.h is not None)
    @rule(data=st.data(), seed=st.integers(0, 5), bad=st.booleans())
    def update(self, data, seed, bad):
        _count("update_bad" if bad else "update")
        name = data.draw(st.sampled_from(self._names()))
        new = _plan(self.model, self.kinds[name], seed, bad=bad)  # same kind: the same (layer, site) pairs
        if self.backend == "fold":
            with pytest.raises(fs.AttachError, match="bakes values into weights"):
                self.h.update(name, new)
            return
        if not bad:
            self.h.update(name, new)
            self.plans = {**self.plans, name: new}
            return
        routed = self.routing in (("all", name), ("rows", [name, name]))
        if not routed:  # the bad values might first run at any later step: not modelled, skip
            return
        try:
            self.h.update(name, new)
        except fs.NonFiniteActivationError:  # auto: the refold found non-finite weights
            _count("  bad update refused by update()")
            return
        with pytest.raises(fs.NonFiniteActivationError, match="was undone"), torch.no_grad():
            self.model(self.ids)
        _count("  bad update undone at the next forward")

    @precondition(lambda self: self.h is not None and self.multi)
    @rule(seed=st.integers(0, 5))
    def add_or_remove_plan(self, seed):
        _count("add_or_remove_plan")
        if "c" in self.plans:
            if self.routing is not None and "c" in (self.routing[1] if self.routing[0] in ("rows", "tokens") else []):
                how = "route_tokens" if self.routing[0] == "tokens" else "route"
                with pytest.raises(fs.AttachError, match=f"is routed to by {how}"):
                    self.h.remove_plan("c")
                _count(f"  remove_plan refused: routed by {how}")
                return
            self.h.remove_plan("c")
            self.plans = {k: v for k, v in self.plans.items() if k != "c"}
            if self.routing == ("all", "c"):
                self.routing = None
        else:
            p = _plan(self.model, "gated", seed)
            self.h.add_plan("c", p)
            self.plans = {**self.plans, "c": p}
            self.kinds = {**self.kinds, "c": "gated"}

    @precondition(lambda self: self.h is not None)
    @rule()
    def generate(self):
        _count("generate")
        if self.routing is None:
            return
        kw = dict(max_new_tokens=2, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            got = self.model.generate(self.ids, **kw)
        if self.backend in ("reference", "torch") and self.dtype == torch.float32:
            with self._reference() as ref, torch.no_grad():
                assert ref is not None
                assert torch.equal(got, self.twin.generate(self.ids, **kw))

    @precondition(lambda self: self.h is not None)
    @rule()
    def detach(self):
        _count("detach")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "... was written while a plan was folded into it"
            self.h.detach()
            self.h.detach()
        self.old, self.h = self.h, None

    @precondition(lambda self: self.old is not None)
    @rule(which=st.sampled_from(["update", "route", "route_all", "set_prompt_length", "with", "add_plan",
                                 "remove_plan"]))
    def call_detached_handle(self, which):
        _count("call_detached_handle")
        h, p = self.old, _plan(self.model, "static", 0)
        calls = {"update": lambda: h.update(h.plan_names[0], p), "route": lambda: h.route(h.plan_names[:1] * 2),
                 "route_all": lambda: h.route_all(None), "set_prompt_length": lambda: h.set_prompt_length(2),
                 "with": lambda: h.__enter__(), "add_plan": lambda: h.add_plan("z", p),
                 "remove_plan": lambda: h.remove_plan(h.plan_names[0])}
        with pytest.raises(fs.AttachError, match="detached"):
            calls[which]()

    @rule(dtype=st.sampled_from(DTYPES))
    def move(self, dtype):
        _count("move")
        if self.h is not None:
            if dtype != self.dtype:
                with pytest.raises(fs.AttachError, match="nothing was changed"):
                    self.model.to(dtype)
            else:
                self.model.to(dtype)  # a move that changes nothing is allowed
            return
        self.model.to(dtype)
        self.twin.to(dtype)
        self.dtype = dtype

    # ---- the checks after every step ------------------------------------------------------------------
    def _reference(self):
        """The reference backend on the twin with the expected plans, routing and prompt length."""
        kw = dict(sites="all", capacity=3) if self.multi else {}
        ref = fs.attach(self.twin, self.plans if self.multi else self.plans["plan"], backend="reference", **kw)
        kind, what = self.routing[:2]
        if kind == "all":
            ref.route_all(what)
        elif kind == "tokens":
            ref.route_tokens(torch.tensor([[ref.plan_id(r)] for r in what]), torch.full((2, 1), self.routing[2]))
        else:
            ref.route(what)
        ref.set_prompt_length(self.plen)
        return ref

    @invariant()
    def matches(self):
        STATS["checks"] += 1
        with torch.no_grad():
            if self.h is None:
                now, want = self.model.state_dict(), self.twin.state_dict()
                assert set(now) == set(want)
                for k, v in now.items():
                    assert v.dtype == want[k].dtype and torch.equal(v, want[k]), k
                for n, mod in self.model.named_modules():
                    assert not {"forward", "_apply", "generate", "load_state_dict"} & set(mod.__dict__), n
                assert torch.equal(self.model(self.ids).logits, self.twin(self.ids).logits)
                return
            if self.routing is None:
                with pytest.raises(fs.AttachError, match="route"):
                    self.model(self.ids)
                return
            if self.tainted:  # the user replaced a folded weight: steering there is not what the plan says
                return
            got = self.model(self.ids).logits
            with self._reference():
                want = self.twin(self.ids).logits
        assert got.dtype == want.dtype
        if self.backend in ("reference", "torch"):
            assert torch.equal(got, want)
        else:  # fold rounds W*a once in the weights' dtype
            tol = 2e-4 if self.dtype == torch.float32 else 6e-2
            torch.testing.assert_close(got.float(), want.float(), atol=tol * (1 + want.abs().max().item()), rtol=0)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add contention on a shared machine
    yield
    torch.set_num_threads(n)


TestLifecycle = Lifecycle.TestCase
TestLifecycle.settings = settings(max_examples=SEQUENCES, stateful_step_count=STEPS, deadline=None,
                                  suppress_health_check=list(HealthCheck))


def test_lifecycle_counts(capsys):
    """Runs after the machine (file order): report what it ran."""
    with capsys.disabled():
        print(f"\nlifecycle state machine: {STATS['sequences']} sequences, {STATS['steps']} steps, "
              f"{STATS['checks']} checks; rules: {dict(sorted(RULES.items()))}")
    if STATS["sequences"]:
        assert STATS["sequences"] >= SEQUENCES
