"""Per-token routing, computed on the device once per forward.

Routing is computed from tensors the model already has: the token positions every decoder layer receives
(``position_ids``), a persistent per-row plan-id tensor and a persistent per-row prompt-length tensor, all
written in place. No host sync, no Python branch on tensor values, no HF keyword for the KV cache: the same code
runs eagerly, under ``torch.compile(fullgraph=True)`` and inside CUDA graphs, and changing the routing or a
plan's values never recompiles. The slot of a token (which table row it reads) is the plan table's encoding
(:func:`.tables.slots_of`).

A token at position ``p`` of row ``r`` is a *generated* token iff ``p >= prompt_len[r]``. The prompt length is
learnt on the device: inside ``generate()`` at its first forward (``max position + 1`` per row, so left padding
with positions from the attention mask gives each row its own length, and ``use_cache=False``, which re-runs
the whole sequence every step, keeps the length of the real prompt); outside ``generate()`` at every forward
whose row starts at position 0 (a hand-written loop's prefill). ``set_prompt_length`` overrides both.
"""

from __future__ import annotations

import numbers
from typing import Mapping

import torch

from ..errors import AttachError
from .tables import SiteTable, slot_of, slots_of, static_address


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _broadcasts(shape, to) -> bool:
    try:
        return tuple(torch.broadcast_shapes(tuple(shape), tuple(to))) == tuple(to)
    except RuntimeError:
        return False


class Router:
    """Computes, once per forward and on the device, the slot of every token.

    Host-side it remembers what ``route`` / ``route_all`` asked (for the eager fast paths and for error
    messages); device-side it keeps ``plan`` (per-row plan ids) and ``plen`` (per-row prompt lengths), both
    int64 ``[capacity_rows, 1]`` written in place, plus two flags ``[force, auto]`` that say when the prompt
    length is learnt.
    """

    def __init__(self, n_plans: int, default_plan: int | None, device=None, rows: int = 64):
        self.n_plans = n_plans
        self.default_plan = default_plan
        self.host_rows: list[int] | None = None  # route(): plan id per row
        self.host_slots: frozenset[int] = frozenset()  # the slots those rows can use (both phases)
        self.n_rows = 0  # len(host_rows), read under compile instead of the list
        self.tokens = None  # route_tokens(): (plan ids, prompt lengths) broadcastable to [batch, seq]
        self.token_plans: frozenset = frozenset()  # the plan ids route_tokens() refers to (host side)
        self.explicit = False  # set_prompt_length() was given lengths
        self.plen_fill = 0  # the prompt length of a row the host did not set one for (set_prompt_length(int))
        self.n_plen: int | None = None  # set_prompt_length([...]): how many rows it gave lengths for
        self.plan_names: list = []  # the attached plans (for error messages only)
        self.device = device
        self.plan = static_address(torch.zeros(rows, 1, dtype=torch.int64, device=device))
        self.plen = static_address(torch.zeros(rows, 1, dtype=torch.int64, device=device))
        self.flags = static_address(torch.tensor([0, 1], dtype=torch.int64, device=device))  # [force, auto]
        self._fill_default()
        self._update_ready()
        # per-forward state (reset by the decoder stack's wrapper)
        self.slots: torch.Tensor | None = None  # [B*T] int32
        self.row_slots: torch.Tensor | None = None  # [B] int64: the slot of each row when phase does not matter
        self._on: dict = {}  # the same two, moved to the devices of other layers (models split over devices)
        self.batch = 0

    def _update_ready(self) -> None:
        # a plain bool read under torch.compile (a guard on it stays true), instead of the plan ids themselves
        self.ready = self.tokens is not None or self.host_rows is not None or self.default_plan is not None

    # ---- what the handle asks --------------------------------------------------------------------------
    def _fill_default(self) -> None:
        self.plan.fill_(self.default_plan or 0)

    def _grow(self, rows: int) -> None:
        if rows <= self.plan.shape[0]:
            return
        # the new rows get what the host asked for every row (the default plan, set_prompt_length(int)), never
        # a zero nobody asked for; rows of a route() / set_prompt_length([...]) list are checked against the batch
        n = max(rows, 2 * self.plan.shape[0])
        plan = torch.full((n, 1), self.default_plan or 0, dtype=torch.int64, device=self.device)
        plen = torch.full((n, 1), self.plen_fill, dtype=torch.int64, device=self.device)
        if self.host_rows is not None:
            plan[: self.plan.shape[0]] = self.plan
        plen[: self.plen.shape[0]] = self.plen
        self.plan, self.plen = static_address(plan), static_address(plen)

    def set_default(self, plan_id: int) -> None:
        """Every row uses one plan, whatever the batch size."""
        self.default_plan = plan_id
        self.set_rows(None)

    def set_rows(self, row_plans: list[int] | None) -> None:
        self.tokens, self.token_plans = None, frozenset()
        if row_plans is None:
            self.host_rows, self.n_rows = None, 0
            self._fill_default()
        else:
            self._grow(len(row_plans))
            self.host_rows, self.n_rows = list(row_plans), len(row_plans)
            self.host_slots = frozenset(slot_of(p, g) for p in set(self.host_rows) for g in (False, True))
            self.plan[: len(row_plans), 0].copy_(torch.tensor(row_plans, dtype=torch.int64))
        self._update_ready()

    def set_tokens(self, plan_ids: torch.Tensor, prompt_lens: torch.Tensor) -> None:
        self.tokens = (plan_ids.to(self.device, torch.int64), prompt_lens.to(self.device, torch.int64))
        self.token_plans = frozenset(int(i) for i in plan_ids.reshape(-1).unique().tolist())
        self.host_rows, self.n_rows = None, 0
        self._update_ready()

    def set_prompt_length(self, n) -> None:
        if n is None:
            self.explicit, self.plen_fill, self.n_plen = False, 0, None
            self.flags.copy_(torch.tensor([0, 1]))
            return
        if isinstance(n, int):
            self.plen_fill, self.n_plen = n, None
            self.plen.fill_(n)
        else:
            vals = list(n)
            self.plen_fill, self.n_plen = 0, len(vals)
            self._grow(len(vals))
            self.plen[: len(vals), 0].copy_(torch.tensor(vals, dtype=torch.int64))
        self.explicit = True
        self.flags.copy_(torch.tensor([0, 0]))

    def begin_generate(self) -> bool:
        """generate() starts: learn the prompt length at its first forward only. Returns whether it armed."""
        if self.explicit:
            return False
        self.flags.copy_(torch.tensor([1, 0]))
        return True

    def end_generate(self) -> None:
        if not self.explicit:
            self.flags.copy_(torch.tensor([0, 1]))

    def wrap_generate(self, model, patcher) -> None:
        """``model.generate`` learns the prompt length at its first forward only (right with and without the
        cache); the wrapper is undone by ``patcher``."""
        orig = getattr(model, "generate", None)
        if orig is None:
            return

        def generate(*args, **kwargs):
            self.begin_generate()
            try:
                return orig(*args, **kwargs)
            finally:
                self.end_generate()
        generate.__wrapped__ = orig
        patcher.set_attr(model, "generate", generate)

    # ---- per forward -----------------------------------------------------------------------------------
    def reset(self) -> None:
        self.slots = self.row_slots = None
        self._on = {}

    def on(self, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(slots, row_slots) of this forward on ``device``."""
        if self.slots.device == device:
            return self.slots, self.row_slots
        got = self._on.get(device)
        if got is None:
            rs = None if self.row_slots is None else self.row_slots.to(device)
            got = self._on[device] = (self.slots.to(device), rs)
        return got

    def prepare(self, hidden: torch.Tensor, positions: torch.Tensor | None) -> None:
        """Compute this forward's slots from the positions the first steered layer receives."""
        if self.slots is not None:
            return
        if hidden.dim() != 3:
            raise AttachError(f"cannot route: decoder layer input has shape {tuple(hidden.shape)}, expected "
                              f"[batch, seq, hidden]")
        batch, seqlen = hidden.shape[0], hidden.shape[1]
        if positions is None:
            raise AttachError("cannot route: the decoder layer received no position_ids; gating needs the token "
                              "positions every layer gets from the model")
        if not self.ready:
            raise AttachError(self._unrouted())
        if self.host_rows is not None and self.n_rows != batch:
            raise AttachError(
                f"routing has {self.n_rows} rows but the batch has {batch}; call handle.route() with one entry "
                f"per batch row (generate() with num_return_sequences or beams expands the batch: route "
                f"every expanded row)")
        if self.n_plen is not None and self.n_plen != batch and self.tokens is None:
            raise AttachError(
                f"set_prompt_length() was given {self.n_plen} lengths but the batch has {batch} rows; give one "
                f"length per batch row, one int for every row, or None to learn the lengths again")
        if self.tokens is not None:
            for what, t in zip(("plan_ids", "prompt_lens"), self.tokens):
                if not _broadcasts(t.shape, (batch, seqlen)):
                    raise AttachError(f"route_tokens: {what} has shape {list(t.shape)}, which does not broadcast "
                                      f"to this forward's [batch, seq] = [{batch}, {seqlen}]; route again with "
                                      f"tensors of shape [batch, seq], [batch, 1] or [seq]")
        self._grow(batch)
        pos = positions.to(torch.int64)
        if pos.dim() == 1:
            pos = pos.unsqueeze(0)
        pos = pos.expand(batch, seqlen)
        if self.tokens is not None:
            plan = self.tokens[0].expand(batch, seqlen)
            plen = self.tokens[1].expand(batch, seqlen)
        else:
            plan = self.plan[:batch]
            cur = self.plen[:batch]
            force, auto = self.flags[0], self.flags[1]
            learn = (force > 0) | ((auto > 0) & (pos.amin(dim=1, keepdim=True) == 0))
            plen = torch.where(learn, pos.amax(dim=1, keepdim=True) + 1, cur)
            cur.copy_(plen)
            self.flags[0:1].zero_()
        gen = (pos >= plen).to(torch.int64)
        self.slots = slots_of(plan.expand(batch, seqlen), gen).reshape(-1).to(torch.int32)
        self.row_slots = None if self.tokens is not None else slots_of(plan, torch.zeros_like(plan)).reshape(-1)
        self.batch = batch

    def _unrouted(self) -> str:
        n = len(self.plan_names)
        if n == 0:
            return ("no plan is attached to this handle yet: add_plan() one and say which rows use it with "
                    "handle.route([...]) (one plan name or None per batch row) or handle.route_all(name); "
                    "route_all(None) runs every row unsteered")
        if n == 1:
            return (f"plan {self.plan_names[0]!r} was added with add_plan(), so no row uses it yet: call "
                    f"handle.route([...]) with one plan name (or None) per batch row, or handle.route_all(name), "
                    f"before running the model")
        return (f"{n} plans are attached ({', '.join(map(repr, self.plan_names))}): call handle.route([...]) with "
                f"one plan name (or None) per batch row, or handle.route_all(name), before running the model")

    def plans_in_use(self) -> set[int]:
        """The plan ids some row or token is routed to now (host side: route, route_all, route_tokens)."""
        if self.tokens is not None:
            return set(self.token_plans) - {0}
        if self.host_rows is not None:
            return set(self.host_rows) - {0}
        return {self.default_plan} - {None, 0}

    def uniform_plan(self) -> int | None:
        """The one plan id every row uses, when the host knows it (eager only; None under compile)."""
        if _compiling() or self.tokens is not None:
            return None
        if self.host_rows is None:
            return self.default_plan
        first = self.host_rows[0] if self.host_rows else 0
        return first if all(r == first for r in self.host_rows) else None

    def host_slot(self, table: SiteTable) -> int | None:
        """The slot every token uses at this table, when the host knows it without reading the device."""
        p = self.uniform_plan()
        if p is None:
            return None
        if p == 0:
            return 0
        return slot_of(p, False) if table.phase_free[p] else None

    def rows_flags(self, table: SiteTable) -> tuple[bool, bool]:
        """Eager only: (no row's plan acts at this table, every row's map is additive) over the slots the routed
        rows can use; (False, False) when the host does not know (compiling, token routing, no route)."""
        if _compiling() or self.tokens is not None or self.host_rows is None:
            return False, False
        used = self.host_slots
        return all(table.identity_rows[s] for s in used), all(table.additive_rows[s] for s in used)

    def rows_phase_free(self, table: SiteTable) -> bool:
        """Eager only: every plan in use maps prompt and generated tokens alike at this table."""
        if _compiling() or self.host_rows is None or self.row_slots is None:
            return False
        return all(table.phase_free[p] for p in set(self.host_rows))


# ---- what the handle's routing calls accept -----------------------------------------------------------
MAX_LENGTH = 2 ** 62  # prompt lengths and positions are int64 on the device
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_length(v, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v < MAX_LENGTH:
        raise AttachError(f"{where}: expected a prompt length as an integer in [0, 2**62), got {v!r}")
    return int(v)


def prompt_lengths(n):
    """set_prompt_length()'s argument checked: None, one int, or a non-empty list of them."""
    if n is None:
        return None
    if isinstance(n, (list, tuple)):
        if not n:
            raise AttachError("set_prompt_length: got an empty list; give one length per batch row")
        return [check_length(v, f"set_prompt_length row {i}") for i, v in enumerate(n)]
    return check_length(n, "set_prompt_length")


def row_ids(rows, ids: dict, names: list) -> list[int]:
    """route()'s rows (plan names, None or plan ids) as plan ids, or AttachError naming the bad row."""
    if isinstance(rows, (str, bytes, Mapping, set, frozenset)) or not hasattr(rows, "__iter__"):
        raise AttachError(f"route() expects a list with one entry per batch row (a plan name, None or a plan "
                          f"id), got {type(rows).__name__} {rows!r}; to use one plan (or None) for every row "
                          f"whatever the batch size, call route_all(name)")
    rows = list(rows)
    if not rows:
        raise AttachError("route() got no rows; give one entry per batch row")
    out = []
    valid = set(ids.values()) | {0}
    for i, r in enumerate(rows):
        if r is None:
            out.append(0)
        elif isinstance(r, str):
            if r not in ids:
                raise AttachError(f"route row {i}: unknown plan {r!r}; attached plans: {names}")
            out.append(ids[r])
        elif isinstance(r, int) and not isinstance(r, bool) and r in valid:
            out.append(r)
        else:
            raise AttachError(f"route row {i}: expected a plan name, None or an attached plan id "
                              f"{sorted(valid)}, got {r!r}")
    return out


def token_ids(plan_ids, prompt_lens, ids: dict) -> list[int]:
    """route_tokens()'s tensors checked (dtype, rank, attached ids, length range); returns the plan ids used."""
    for what, t in (("plan_ids", plan_ids), ("prompt_lens", prompt_lens)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _INT_DTYPES or t.dim() > 2 or t.numel() == 0:
            got = f"{t.dtype} tensor of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise AttachError(f"route_tokens: {what} must be a non-empty integer tensor (int8..int64 or uint8) of "
                              f"at most 2 dims, broadcastable to [batch, seq]; got {got}")
    valid = sorted(set(ids.values()) | {0})
    pids = plan_ids.cpu().to(torch.int64)
    bad = ~torch.isin(pids, torch.tensor(valid))
    if bool(bad.any()):
        raise AttachError(f"route_tokens: plan id {int(pids[bad][0])} is not attached; ids: {valid}")
    lens = prompt_lens.cpu().to(torch.int64)
    if bool((lens < 0).any()) or bool((lens >= MAX_LENGTH).any()):
        raise AttachError("route_tokens: prompt_lens must be in [0, 2**62)")
    return sorted(set(pids.reshape(-1).tolist()))
