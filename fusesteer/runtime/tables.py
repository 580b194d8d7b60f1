"""The plan table: the one owner of attached plans, their ids and their compiled per-site tables.

Several plans attached at once are compiled into one table per touched (layer, site):
``A, B: float32 [S, W]`` with S = 1 + 2 * capacity. Row 0 is the identity; plan p (1-based) owns the two rows
:func:`slot_of` gives (its map for prompt tokens, its map for generated tokens), each the composition of that
plan's entries whose gating admits the phase. A token's *slot* therefore encodes both the routing (which plan
its batch row uses) and the gating (prompt or generated position), and a backend only ever computes
``x' = A[slot] * x + B[slot]``. This module is the only place that knows the encoding: :func:`slot_of` on the
host, :func:`slots_of` on the device.

:class:`PlanTable` owns the plan names and ids, the capacity, the bound plans and their composed maps, the
per-site tables and their row flags (computed when a row is written, in one place), and writes with rollback.
The router (per-token routing on the device) lives in :mod:`.routing`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import AttachError
from ..formula import is_gain_free, is_identity
from .plan import PHASES, ModelSpec, SteeringPlan


def slot_of(plan_id: int, generated: bool) -> int:
    """The table row of plan ``plan_id`` (0 = unsteered) for prompt or generated tokens."""
    return 0 if plan_id == 0 else 2 * plan_id - 1 + int(generated)


def static_address(t: torch.Tensor) -> torch.Tensor:
    """Mark a persistent tensor as a static input for torch.compile / CUDA graphs (written in place only)."""
    try:
        torch._dynamo.mark_static_address(t)
    except Exception:  # noqa: BLE001 - older torch, or a tensor dynamo cannot mark: plain input then
        pass
    return t


def slots_of(plan: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """:func:`slot_of` on the device: per-token plan ids and 0/1 generated flags (int64) -> slots."""
    return torch.where(plan == 0, torch.zeros_like(plan), 2 * plan - 1 + generated)


@dataclass
class SiteTable:
    layer: int
    site: str
    A: torch.Tensor  # [S, W] float32 on the layer's device
    B: torch.Tensor
    identity_rows: list[bool]  # per slot: row is exactly (1, 0)
    additive_rows: list[bool]  # per slot: a == 1 everywhere (x + b suffices)
    phase_free: list[bool] = field(default_factory=list)  # per plan id: prompt row == generated row
    rows_a: list = field(default_factory=list)  # per-slot views A[s] (1-D)
    rows_b: list = field(default_factory=list)
    cols: slice | None = None  # tensor parallelism: the columns of the full-width maps this rank's table holds

    def __post_init__(self):
        self.rows_a = [self.A[s] for s in range(self.A.shape[0])]
        self.rows_b = [self.B[s] for s in range(self.B.shape[0])]
        static_address(self.A)
        static_address(self.B)

    @property
    def n_slots(self) -> int:
        return self.A.shape[0]

    def write_plan(self, plan_id: int, maps: dict | None) -> None:
        """The two rows of one plan in place: ``maps`` = {phase: (a, b)} dense fp32, or None (identity)."""
        for ph in PHASES:
            s = slot_of(plan_id, ph == "generated")
            if maps is not None:
                a, b = maps[ph]
                if self.cols is not None:
                    a, b = a[self.cols], b[self.cols]
                self.A[s].copy_(a)
                self.B[s].copy_(b)
            else:
                self.A[s].fill_(1.0)
                self.B[s].zero_()
        self.flag_plan(plan_id)

    def flag_plan(self, plan_id: int) -> None:
        """The row flags of one plan, from the rows as written (the one place they are computed)."""
        p, g = slot_of(plan_id, False), slot_of(plan_id, True)
        for s in {p, g}:
            self.additive_rows[s] = is_gain_free(self.A[s])
            self.identity_rows[s] = self.additive_rows[s] and is_identity(None, self.B[s])
        self.phase_free[plan_id] = plan_id == 0 or (torch.equal(self.A[p], self.A[g])
                                                    and torch.equal(self.B[p], self.B[g]))


def host_tables(spec: ModelSpec, keys, capacity: int, maps: dict) -> dict:
    """{(layer, site): (A, B)} float32 host tensors for plans' phase maps {plan id: maps} over the given keys."""
    n_slots = 1 + 2 * capacity
    out = {}
    for key in keys:
        width = spec.site_width(key[1])
        A = torch.ones(n_slots, width, dtype=torch.float32)
        B = torch.zeros(n_slots, width, dtype=torch.float32)
        for pid, m in maps.items():
            if key in m:
                for ph in PHASES:
                    s = slot_of(pid, ph == "generated")
                    A[s], B[s] = m[key][ph]
        out[key] = (A, B)
    return out


def map_keys(maps) -> set:
    """The (layer, site) pairs of several plans' phase maps."""
    return {k for m in maps for k in m}


def build_tables(spec: ModelSpec, devices: dict[int, torch.device], keys, capacity: int, maps: dict,
                 shards: dict | None = None) -> dict:
    """Compile plans' phase maps {plan id: maps} into {(layer, site): SiteTable} over ``keys``; ``shards``:
    {(layer, site): columns} this rank holds of a tensor-parallel site (its table holds those columns only)."""
    shards = shards or {}
    try:
        out = {}
        for key, (A, B) in host_tables(spec, sorted(keys), capacity, maps).items():
            dev = devices.get(key[0])
            n = A.shape[0]
            cols = shards.get(key)
            if cols is not None:
                A, B = A[:, cols].contiguous(), B[:, cols].contiguous()
            t = out[key] = SiteTable(key[0], key[1], A.to(dev), B.to(dev), [True] * n, [True] * n,
                                     [True] * (capacity + 1), cols=cols)
            for pid in range(capacity + 1):
                t.flag_plan(pid)
        return out
    except (MemoryError, RuntimeError) as e:
        if not (isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "alloc" in str(e)):
            raise
        need = 2 * 4 * (1 + 2 * capacity) * sum(spec.site_width(k[1]) for k in keys)
        raise AttachError(f"capacity={capacity}: the plan tables for {len(keys)} (layer, site) pairs would take "
                          f"{need / 2**30:.3g} GiB, which could not be allocated ({type(e).__name__}); attach with "
                          f"a smaller capacity or fewer sites") from None


class PlanTable:
    """The attached plans of one handle: names -> ids (1..capacity; 0 is unsteered), the bound plans and their
    composed maps, the per-site tables (``tables``: {(layer, site): SiteTable}) over ``keys``.

    :meth:`commit` makes a new set of plans current, writing only the rows of the plan ids whose plan changed;
    ``on_change`` (the backend re-planning) runs after the write, and if it raises, the previous plans are
    written back and it runs again before the error is re-raised."""

    def __init__(self, spec: ModelSpec, capacity: int, plans: dict, devices: dict, extra_keys: set = frozenset(),
                 shards=None):
        self.spec = spec
        self.capacity = capacity
        self._compiled: dict[int, tuple] = {}  # id(bound plan) -> (plan, its phase maps): composed once per plan
        self.plans: dict[str, SteeringPlan] = dict(plans)
        self.ids: dict[str, int] = {n: i + 1 for i, n in enumerate(self.plans)}
        self.names: list[str] = list(self.plans)
        self.keys = map_keys(self.maps(p) for p in self.plans.values()) | set(extra_keys)
        by_id = self.by_id()
        self.shards = shards(self.keys) if callable(shards) else dict(shards or {})
        self.tables = build_tables(spec, devices, self.keys, capacity, {i: self.maps(p) for i, p in by_id.items()},
                                   self.shards)
        self._written = by_id  # plan id -> the plan whose values its rows hold

    # ---- what the table holds ----------------------------------------------------------------------
    def maps(self, plan: SteeringPlan) -> dict:
        """The phase maps of a bound plan (composed once per plan object)."""
        got = self._compiled.get(id(plan))
        if got is None or got[0] is not plan:
            got = self._compiled[id(plan)] = (plan, plan.phase_maps(self.spec))
        return got[1]

    def by_id(self) -> dict[int, SteeringPlan]:
        return {self.ids[n]: p for n, p in self.plans.items()}

    def plan_id(self, name: str) -> int | None:
        return self.ids.get(name)

    def free_id(self) -> int | None:
        used = set(self.ids.values())
        return next((i for i in range(1, self.capacity + 1) if i not in used), None)

    def outside(self, plan: SteeringPlan) -> list:
        """The (layer, site) pairs ``plan`` acts at that the tables do not cover, sorted."""
        return sorted(map_keys([self.maps(plan)]) - self.keys)

    @property
    def n_slots(self) -> int:
        return 1 + 2 * self.capacity

    # ---- writes ------------------------------------------------------------------------------------
    def commit(self, plans: dict, ids: dict | None = None, on_change=None) -> None:
        """Make ``plans`` {name: bound plan} current with ids ``ids`` (default: unchanged)."""
        old_plans, old_ids = dict(self.plans), dict(self.ids)
        self._set(plans, dict(old_ids if ids is None else ids))
        if on_change is None:
            return
        try:
            on_change()
        except BaseException as err:
            self._set(old_plans, old_ids)
            try:
                on_change()
            except BaseException as e2:
                raise AttachError(f"the new values were refused ({err}) and the previous ones could not be "
                                  f"installed again ({type(e2).__name__}: {e2}); detach this handle") from err
            raise

    def _set(self, plans: dict, ids: dict) -> None:
        self.ids = ids
        self.names[:] = sorted(ids, key=ids.get)  # in place: the router shows the same list in its messages
        self.plans = plans
        live = {id(p) for p in plans.values()}  # keep the composed maps of attached plans only
        self._compiled = {k: v for k, v in self._compiled.items() if k in live}
        want = self.by_id()
        for pid in sorted(set(want) | set(self._written)):  # only the plan ids whose plan changed
            if want.get(pid) is not self._written.get(pid):
                maps = self.maps(want[pid]) if pid in want else {}
                for k, table in self.tables.items():
                    table.write_plan(pid, maps.get(k))
        self._written = want
