"""Plan tables and per-token routing shared by every run-time backend.

Several plans attached at once are compiled into one table per touched (layer, site):
``A, B: float32 [S, W]`` with S = 1 + 2 * n_plans. Row 0 is the identity; plan p (1-based) owns row
``2p - 1`` (its map for prompt tokens) and row ``2p`` (its map for generated tokens), each the composition
of that plan's entries whose gating admits the phase. A token's *slot* therefore encodes both the routing
(which plan its batch row uses) and the gating (prompt or generated position), and a backend only ever
computes ``x' = A[slot] * x + B[slot]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import AttachError
from .plan import PHASES, ModelSpec, SteeringPlan


def slot_of(plan_id: int, generated: bool) -> int:
    return 0 if plan_id == 0 else 2 * plan_id - 1 + int(generated)


@dataclass
class SiteTable:
    layer: int
    site: str
    A: torch.Tensor  # [S, W] float32 on the layer's device
    B: torch.Tensor
    identity_rows: list[bool]  # per slot: row is exactly (1, 0)
    additive_rows: list[bool]  # per slot: a == 1 everywhere (x + b suffices)
    rows_a: list = field(default_factory=list)  # per-slot views A[s] (1-D)
    rows_b: list = field(default_factory=list)

    def __post_init__(self):
        self.rows_a = [self.A[s] for s in range(self.A.shape[0])]
        self.rows_b = [self.B[s] for s in range(self.B.shape[0])]

    @property
    def n_slots(self) -> int:
        return self.A.shape[0]


def build_tables(plans: list[SteeringPlan], spec: ModelSpec, devices: dict[int, torch.device]) -> dict:
    """Compile plans (plan id i+1 = plans[i]) into {(layer, site): SiteTable}."""
    n_slots = 1 + 2 * len(plans)
    maps = [p.phase_maps(spec) for p in plans]
    keys = sorted({k for m in maps for k in m})
    tables = {}
    for key in keys:
        layer, site = key
        width = spec.site_width(site)
        A = torch.ones(n_slots, width, dtype=torch.float32)
        B = torch.zeros(n_slots, width, dtype=torch.float32)
        for pid, m in enumerate(maps, start=1):
            if key not in m:
                continue
            for ph in PHASES:
                s = slot_of(pid, ph == "generated")
                A[s], B[s] = m[key][ph]
        ident = [bool((A[s] == 1).all() and (B[s] == 0).all()) for s in range(n_slots)]
        addit = [bool((A[s] == 1).all()) for s in range(n_slots)]
        dev = devices.get(layer)
        tables[key] = SiteTable(layer, site, A.to(dev), B.to(dev), ident, addit)
    return tables


class Router:
    """Decides, for each forward pass, which slot every token uses.

    ``row_plans``: per batch row plan id (0 = unsteered), or None = every row uses ``default_plan``.
    The prompt length is learnt at the first forward of a sequence (empty KV cache): positions at or after
    it are *generated* tokens. It can also be set explicitly with :meth:`set_prompt_length`.
    """

    def __init__(self, n_plans: int, default_plan: int | None):
        self.n_plans = n_plans
        self.default_plan = default_plan
        self.row_plans: list[int] | None = None
        self.prompt_len: int | None = None
        self._explicit_prompt_len = False
        # per-forward state read by the backends
        self.uniform_slot: int | None = 0
        self.slots: torch.Tensor | None = None  # [B*T] int32 when not uniform
        # [B] int64 when every token of a row uses the same slot (one phase in this forward): lets the torch
        # backend gather one table row per batch row and broadcast it over the sequence
        self.row_slots: torch.Tensor | None = None
        self.batch, self.seqlen = 0, 0
        self._slot_cache: dict = {}

    def set_rows(self, row_plans: list[int] | None) -> None:
        self.row_plans = row_plans
        self._slot_cache.clear()

    def set_prompt_length(self, n: int | None) -> None:
        self.prompt_len = n
        self._explicit_prompt_len = n is not None

    def begin(self, batch: int, seqlen: int, past: int, device) -> None:
        """Called once per forward of the decoder stack, before any layer runs."""
        if past == 0 and not self._explicit_prompt_len:
            self.prompt_len = seqlen
        prompt_len = self.prompt_len if self.prompt_len is not None else past + seqlen
        if self.row_plans is None:
            if self.default_plan is None:
                raise AttachError("several plans are attached: call handle.route([...]) with one plan name "
                                  "(or None) per batch row before running the model")
            rows = [self.default_plan]
        else:
            rows = self.row_plans
            if len(rows) != batch:
                raise AttachError(
                    f"routing has {len(rows)} rows but the batch has {batch}; call handle.route() with one entry "
                    f"per batch row (generate() with num_return_sequences or beams expands the batch: route "
                    f"every expanded row)")
        self.batch, self.seqlen = batch, seqlen
        n_gen_start = max(0, min(seqlen, prompt_len - past))  # first local index that is a generated token
        phases = {False} if n_gen_start >= seqlen else ({True} if n_gen_start == 0 else {False, True})
        plan_set = set(rows)
        if len(plan_set) == 1 and len(phases) == 1:
            self.uniform_slot = slot_of(rows[0], phases.pop())
            self.slots = self.row_slots = None
            return
        self.uniform_slot = None
        key = (tuple(rows), batch, seqlen, n_gen_start, str(device))
        cached = self._slot_cache.get(key)
        if cached is None:
            r = torch.tensor(rows if len(rows) == batch else rows * batch, dtype=torch.int32)
            gen = (torch.arange(seqlen) >= n_gen_start).to(torch.int32)
            slots = torch.where(r[:, None] == 0, torch.zeros((), dtype=torch.int32), 2 * r[:, None] - 1 + gen[None, :])
            cached = slots.reshape(-1).to(torch.int32).to(device)
            if len(self._slot_cache) > 64:
                self._slot_cache.clear()
            row = slots[:, 0].to(torch.int64).to(device) if len(phases) == 1 else None
            cached = (cached, row)
            self._slot_cache[key] = cached
        self.slots, self.row_slots = cached


def batch_shape_and_past(args, kwargs) -> tuple[int, int, int, torch.device]:
    """(batch, seqlen, past_len, device) from the decoder stack's forward arguments."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    emb = kwargs.get("inputs_embeds")
    x = ids if ids is not None else emb
    if x is None:
        raise AttachError("cannot route: the model was called without input_ids or inputs_embeds")
    batch, seqlen = int(x.shape[0]), int(x.shape[1])
    pkv = kwargs.get("past_key_values")
    past = 0
    if pkv is not None and hasattr(pkv, "get_seq_length"):
        past = int(pkv.get_seq_length())
    return batch, seqlen, past, x.device
