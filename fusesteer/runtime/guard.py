"""The non-finite guard of a steering handle.

A plan's values are checked for NaN/Inf in the activations they produce: after attach, after add_plan(), and
after every update(), the first forward that runs each *phase* of that plan (its prompt tokens, its generated
tokens) records ``isfinite(y).all()`` at every steered site, on the device, and reads them all back with one
host sync at the end of that forward (forwards routed only to plans already checked are not checked). So a plan
gated to generated tokens is checked at the first decode step, not only at the prefill, and once every phase of
every plan has run finite, forwards cost nothing more.

When a check fails, the handle raises NonFiniteActivationError at the end of that forward. Values that came
from update() are taken back first: the plan returns to the values it had just before that update (still to
be checked themselves if they never ran), so a rejected update leaves the old values in place.
"""

from __future__ import annotations

import torch

from ..errors import NonFiniteActivationError
from ..formula import is_identity
from .plan import PHASES, SteeringPlan
from .tables import slot_of
from .tp import local


def plan_phases(plan: SteeringPlan, spec, maps=None) -> tuple[set, bool]:
    """(phases where the plan's map is not the identity somewhere, whether both phases map alike); ``maps``:
    the plan's phase maps when the caller has them already."""
    phases = set()
    for m in (plan.phase_maps(spec) if maps is None else maps).values():
        for ph in PHASES:
            if not is_identity(*m[ph]):
                phases.add(ph)
    return phases, all(e.gating == "all" for e in plan.entries)


class FiniteGuard:
    def __init__(self, enabled: bool, spec, parallel: bool = False):
        self.enabled = enabled
        self.spec = spec
        # tensor parallelism: a rank sees only its shard of a sharded site, and every rank must take the same
        # decision, so a checked forward's flags are combined over the ranks (one all-reduce, checked forwards only)
        self.parallel = parallel
        self.pending: dict[str, set] = {}  # plan name -> phases not yet seen finite
        self.free: dict[str, bool] = {}  # plan name -> its prompt and generated maps are the same
        # plan name -> (previous plan, its pending phases, its origin, its own fallback): values to go back to
        self.fallback: dict[str, tuple] = {}
        self.origin: dict[str, str] = {}  # plan name -> "attach" / "add_plan()" / "update()"
        self.checking = False
        self._marks: list = []

    # ---- arming ------------------------------------------------------------------------------------
    def arm(self, name: str, plan: SteeringPlan, origin: str, previous: SteeringPlan | None = None,
            maps=None) -> None:
        """``plan`` takes effect under ``name`` (``previous``: the values it replaces, for a rollback)."""
        if not self.enabled:
            return
        if previous is None:
            self.fallback.pop(name, None)
        else:  # confirmed values need no fallback of their own; unconfirmed ones keep theirs (a chain)
            pending = set(self.pending.get(name, ()))
            self.fallback[name] = (previous, pending, self.origin.get(name, "attach"),
                                   self.fallback.get(name) if pending else None)
        self.pending[name], self.free[name] = plan_phases(plan, self.spec, maps)
        self.origin[name] = origin
        if not self.pending[name]:
            self.fallback.pop(name, None)

    def rollback(self, name: str) -> SteeringPlan | None:
        """The values ``name`` had before its last update (its guard state goes back with them), or None."""
        fb = self.fallback.pop(name, None)
        if fb is None:
            return None
        previous, pending, origin, older = fb
        self.pending[name] = set(pending)
        self.free[name] = all(e.gating == "all" for e in previous.entries)
        self.origin[name] = origin
        if older is not None:
            self.fallback[name] = older
        return previous

    def forget(self, name: str) -> None:
        for d in (self.pending, self.free, self.fallback, self.origin):
            d.pop(name, None)

    def snapshot(self, name: str):
        """The guard's state for one plan, to put back with :meth:`restore` when a change is undone."""
        return (set(self.pending.get(name, ())), self.free.get(name), self.fallback.get(name),
                self.origin.get(name))

    def restore(self, name: str, snap) -> None:
        pending, free, fallback, origin = snap
        self.pending[name] = pending
        for d, v in ((self.free, free), (self.fallback, fallback), (self.origin, origin)):
            if v is None:
                d.pop(name, None)
            else:
                d[name] = v

    # ---- per forward ---------------------------------------------------------------------------------
    def begin(self, ids: dict, router) -> None:
        """A forward starts: check it if it can run a plan with phases still to check (nothing is read under
        torch.compile, where nothing is checked: the routing state must not become a guard)."""
        self._marks = []
        self.checking = False
        if not self.enabled or torch.compiler.is_compiling() or not any(self.pending.values()):
            return
        if router.tokens is not None:
            active = None  # per-token routing: the plan ids are on the device
        else:
            active = set(router.host_rows) if router.host_rows is not None else {router.default_plan or 0}
        self.checking = any(phases and (active is None or ids.get(name) in active)
                            for name, phases in self.pending.items())

    def mark(self, layer: int, site: str, y: torch.Tensor) -> None:
        if self.checking and not torch.compiler.is_compiling():
            self._marks.append((layer, site, torch.isfinite(local(y)).all()))

    def end(self, slots: torch.Tensor | None, n_slots: int, ids: dict, failed: bool):
        """After a forward: None if it was fine, else ``(layer, site, names)``: the first site that went
        non-finite and the plans being checked that this forward ran."""
        if not self.checking:
            return None
        self.checking = False
        marks, self._marks = self._marks, []
        if failed or slots is None:
            return None
        dev = slots.device
        seen = torch.zeros(n_slots, dtype=torch.bool, device=dev)
        seen[slots.reshape(-1).long()] = True
        flags = [m[2].to(dev) for m in marks]
        if flags and self.parallel:
            import torch.distributed as dist

            both = torch.stack(flags).to(torch.int64)
            dist.all_reduce(both, op=dist.ReduceOp.MIN)
            flags = list(both.bool())
        vals = torch.cat([torch.stack(flags), seen]).tolist() if flags else seen.tolist()
        ok, seen_slots = vals[:len(flags)], {s for s, v in enumerate(vals[len(flags):]) if v}
        ran = {}
        for name, phases in self.pending.items():
            pid = ids.get(name)
            if not phases or pid is None:
                continue
            got = {ph for ph in PHASES if slot_of(pid, ph == "generated") in seen_slots}
            if got and self.free.get(name):
                got = set(PHASES)
            if got & phases:
                ran[name] = got & phases
        if all(ok):
            for name, got in ran.items():
                self.pending[name] -= got
                if not self.pending[name]:
                    self.fallback.pop(name, None)
            return None
        layer, site, _ = marks[ok.index(False)]
        return layer, site, sorted(ran)

    def reject(self, layer: int, site: str, names: list, plans: dict, commit) -> NonFiniteActivationError:
        """The error for a checked forward that went non-finite at (layer, site) running plans ``names``; before
        it is returned, the plans whose values came from update() go back to their previous values through
        ``commit(plans)`` (the guard's state is put back as it was if that fails)."""
        what = ", ".join(f"plan {n!r} (set by {self.origin.get(n, 'attach')})" for n in names) or "the attached plans"
        snaps = {n: self.snapshot(n) for n in names}
        undone = {n: prev for n in names if n in plans and (prev := self.rollback(n)) is not None}
        note = ""
        if undone:
            try:
                commit({**plans, **undone})
            except BaseException:
                for n, snap in snaps.items():
                    self.restore(n, snap)
                raise
            note = (f"; the update() of {', '.join(repr(n) for n in undone)} was undone: the previous values are "
                    f"in place")
        return NonFiniteActivationError(
            f"steering produced NaN/Inf activations at layer {layer}, site {site!r} on the first forward that ran "
            f"{what}: the plan's values are too large for this model/dtype{note} (pass check_finite=False to "
            f"attach() to skip this check)")
