"""Continuous batching over Hugging Face's KV cache, one plan and one phase per batch row.

One engine thread owns the model. Every iteration it

1. drops cancelled requests (their rows leave the batch at once),
2. admits waiting requests (FIFO) while rows are free, makes sure their effective plans are in the plan
   table (added between two forwards: requests in flight are not touched),
3. prefills the admitted requests in one left-padded forward (prompt phase) and samples their first token,
4. merges their KV cache into the running batch (left padding, so every row ends at the same column),
5. runs one decode forward for every row (generated phase) and samples the next token of each row.

Each row carries its own plan (``Steerer.prepare`` routes it) and its own prompt length; position ids are
per row (the number of real tokens before the token), so a row's tokens get the same positions, plans and
gating as when the request runs alone. A row whose logits go non-finite fails alone: rows never mix in a
forward (matmuls, norms and attention are per row), and its KV rows leave the cache with it. Sampling
(``sampling.py``) is per row too: a row that cannot be sampled with its parameters fails alone.

transformers' own continuous-batching engine (``generate_batch`` / ``ContinuousBatchingManager``) is not
used; see the README's "Server" section for why.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import PlanError
from ..runtime.compat import with_cache
from .metrics import Metrics
from .registry import Steering, effective_plan
from .sampling import RowSampler, Sampling, sample
from .steer import CapacityFull, Steerer

log = logging.getLogger("fusesteer.serve")

_ids = itertools.count(1)


class QueueFull(RuntimeError):
    def __init__(self, retry_after: float):
        super().__init__("the request queue is full")
        self.retry_after = retry_after


@dataclass(eq=False)
class GenRequest:
    """One generation. ``sink`` receives events from the engine thread:
    ("token", id), ("finish", reason), ("error", http_status, message, code)."""

    prompt_ids: list[int]
    max_tokens: int
    sink: Callable[[tuple], None]
    steering: Steering = field(default_factory=Steering)
    sampling: Sampling = field(default_factory=Sampling)
    eos_ids: frozenset = frozenset()
    plan: object = None  # the steering's effective plan, when the HTTP layer composed it already (off this thread)
    endpoint: str = "completions"
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    # engine-owned
    generated: list = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    t_arrival: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_last: float | None = None
    finish_reason: str | None = None
    disconnect_checked_at: float = 0.0  # HTTP layer: when it last asked whether the client is still there

    cancel_reason: str = "cancelled"

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop generating (client gone: "cancelled"; a stop string was seen: "stop"). Any thread."""
        self.cancel_reason = reason
        self.cancelled = True


@dataclass(eq=False)
class _Row:
    req: GenRequest
    key: str | None  # effective plan key (None = unsteered)
    prompt_len: int
    n_cached: int  # real tokens in the KV cache for this row
    pending: int  # sampled token not yet fed to the model
    sampler: RowSampler


# --------------------------------------------------------------------------------------------------
# KV cache helpers (DynamicCache with full layers: [batch, heads, time, dim] keys/values per layer)


def _new_cache():
    from transformers import DynamicCache

    return DynamicCache()


def _kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_from(kv) -> object:
    """A DynamicCache holding these per-layer tensors (no copy: each layer is created empty, then given them)."""
    c = _new_cache()
    for i, (k, v) in enumerate(kv):
        c.update(k[:, :, :0], v[:, :, :0], i)
        layer = c.layers[i]
        layer.keys, layer.values = k, v
    return c


def _left_pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def merge_batches(kv_a, mask_a, kv_b, mask_b):
    """Concatenate two left-padded batches along the batch dimension (left-padding the shorter one)."""
    if kv_a is None:
        return kv_b, mask_b
    ta, tb = mask_a.shape[1], mask_b.shape[1]
    t = max(ta, tb)
    kv = [(torch.cat([_left_pad(ka, t - ta, 2), _left_pad(kb, t - tb, 2)]),
           torch.cat([_left_pad(va, t - ta, 2), _left_pad(vb, t - tb, 2)]))
          for (ka, va), (kb, vb) in zip(kv_a, kv_b)]
    return kv, torch.cat([_left_pad(mask_a, t - ta, 1), _left_pad(mask_b, t - tb, 1)])


def select_rows(kv, mask, keep: list[int], n_cached: list[int]):
    """Keep batch rows ``keep`` and cut the leading columns that are padding in every kept row."""
    if not keep:
        return None, None
    t = mask.shape[1]
    cut = t - max(n_cached)
    idx = torch.tensor(keep, device=mask.device)
    full = len(keep) == mask.shape[0]
    kv = [((k if full else k.index_select(0, idx))[:, :, cut:], (v if full else v.index_select(0, idx))[:, :, cut:])
          for k, v in kv]
    mask = (mask if full else mask.index_select(0, idx))[:, cut:]
    return kv, mask


# --------------------------------------------------------------------------------------------------


class Engine:
    def __init__(self, model, steerer: Steerer, metrics: Metrics | None = None, max_batch: int = 32,
                 max_queue: int = 256, max_prefill_tokens: int = 4096, idle_plan_cache: int = 8):
        self.model = model
        self.steerer = steerer
        self.metrics = metrics or Metrics()
        self.max_batch = int(max_batch)
        self.max_queue = int(max_queue)
        self.max_prefill_tokens = int(max_prefill_tokens)
        self.idle_plan_cache = int(idle_plan_cache)
        self.device = next(model.parameters()).device
        self._cv = threading.Condition()
        self._waiting: deque[GenRequest] = deque()
        self._rows: list[_Row] = []
        self._preload: list[tuple] = []  # (Steering, effective plan or None)
        self._admitting: list[_Row] = []  # admitted, not yet merged into the batch (failed too if a step breaks)
        self._cache = None  # DynamicCache of the running rows (left-padded, all rows end at the last column)
        self._mask = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.step_time_ema = 0.05

    # ---- public (any thread) ---------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._run, name="fusesteer-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for req in list(self._waiting) + [r.req for r in self._rows]:
            self._fail(req, 503, "the server is shutting down", "shutting_down")
        self._waiting.clear()
        self._rows = []

    def submit(self, req: GenRequest) -> None:
        with self._cv:
            if self._stop:
                raise RuntimeError("the engine is stopped")
            # a request that a free row takes at the next step does not wait: max_queue counts the others
            # (so 0 means "429 as soon as every row is busy")
            free = max(0, self.max_batch - len(self._rows) - len(self._admitting))
            if len(self._waiting) >= self.max_queue + free:
                # rough time until a row frees up: the mean remaining tokens of running rows times a step
                retry = max(1.0, min(60.0, self.step_time_ema * 16))
                raise QueueFull(retry)
            self._waiting.append(req)
            self._cv.notify_all()
        self._gauges()

    def preload(self, steering: Steering, plan=None) -> None:
        """Put a plan into the plan table at the next step boundary (so its first request does not pay for it);
        ``plan``: the steering's effective plan, if the caller composed it already."""
        with self._cv:
            self._preload.append((steering, plan))
            self._cv.notify_all()

    def _do_preloads(self) -> None:
        with self._cv:
            todo, self._preload = self._preload, []
        for st, plan in todo:
            if st.key is None or self.steerer.has(st.key):
                continue
            try:
                self.steerer.ensure({st.key: plan if plan is not None else effective_plan(st)}, self._in_use())
            except (CapacityFull, PlanError) as e:  # best effort: the first request adds it otherwise
                log.info("preloading %s skipped: %s", st.label, e)

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    # ---- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stop and not self._waiting and not self._rows and not self._preload:
                        self._cv.wait(0.5)
                    if self._stop:
                        return
                try:
                    if self._preload:
                        self._do_preloads()
                    self._step()
                except Exception as e:
                    log.exception("engine step failed")
                    for r in self._rows + self._admitting:
                        self._fail(r.req, 500, f"internal error in the generation step: {type(e).__name__}: {e}",
                                   "internal_error")
                    self._rows, self._admitting, self._cache, self._mask = [], [], None, None
                self._gauges()

    def _gauges(self) -> None:
        m = self.metrics
        m.set_gauge("active_requests", len(self._rows))
        m.set_gauge("queued_requests", len(self._waiting))
        m.set_gauge("plans_attached", len(self.steerer.held))

    def _emit(self, req: GenRequest, ev: tuple) -> None:
        try:
            req.sink(ev)
        except Exception:
            log.exception("request %s: event sink failed", req.id)
            req.cancelled = True

    def _fail(self, req: GenRequest, status: int, message: str, code: str) -> None:
        if req.done:
            return
        req.done = True
        req.finish_reason = "error"
        self.metrics.count_request(req.endpoint, req.steering.label, code)
        self._emit(req, ("error", status, message, code))

    def _finish(self, req: GenRequest, reason: str) -> None:
        if req.done:
            return
        req.done = True
        req.finish_reason = reason
        self.metrics.count_request(req.endpoint, req.steering.label, "cancelled" if reason == "cancelled" else "ok")
        self._emit(req, ("finish", reason))

    def _token(self, row: _Row, tok: int, now: float) -> bool:
        """Record a sampled token; True if the request is finished."""
        req = row.req
        req.generated.append(tok)
        if req.t_first is None:
            req.t_first = now
            self.metrics.observe_ttft(now - req.t_arrival)
        else:
            self.metrics.observe_itl(now - req.t_last)
        req.t_last = now
        self.metrics.count_tokens(req.steering.label, "generated", 1)
        self._emit(req, ("token", tok))
        if tok in req.eos_ids:
            self._finish(req, "stop")
            return True
        if len(req.generated) >= req.max_tokens:
            self._finish(req, "length")
            return True
        return req.cancelled

    def _in_use(self) -> set:
        return {r.key for r in self._rows if r.key is not None}

    def _admit(self) -> list[_Row]:
        """Pop the waiting requests that fit now; make their plans available."""
        new: list[_Row] = []
        longest = 0
        with self._cv:
            cand = []
            while self._waiting and len(self._rows) + len(cand) < self.max_batch:
                req = self._waiting[0]
                if req.cancelled:
                    self._waiting.popleft()
                    self._finish(req, req.cancel_reason)
                    continue
                n = len(req.prompt_ids)
                if cand and (len(cand) + 1) * max(longest, n) > self.max_prefill_tokens:
                    break
                longest = max(longest, n)
                cand.append(self._waiting.popleft())
        for req in cand:
            key = req.steering.key
            if key is not None and not self.steerer.has(key):
                try:
                    plan = req.plan if req.plan is not None else effective_plan(req.steering)
                    self.steerer.ensure({key: plan}, self._in_use() | {r.key for r in new if r.key})
                except CapacityFull:
                    with self._cv:  # try again once rows free up; keep its place in the queue
                        self._waiting.appendleft(req)
                    continue
                except PlanError as e:
                    self._fail(req, 400, f"steering {req.steering.label!r} cannot be applied: {e}", "invalid_steering")
                    continue
            elif key is not None:
                self.steerer.touch(key)
            n = len(req.prompt_ids)
            new.append(_Row(req, key, n, 0, -1, RowSampler(req.sampling, req.prompt_ids, req.eos_ids)))
            self.metrics.count_tokens(req.steering.label, "prompt", n)
        return new

    def _forward(self, rows: list[_Row], input_ids, mask, pos, cache, phase: str):
        self.steerer.prepare([r.key for r in rows], [r.prompt_len for r in rows], phase)
        t0 = time.perf_counter()
        out = self.model(**with_cache(self.model, cache, input_ids=input_ids, attention_mask=mask, position_ids=pos,
                                      use_cache=True, logits_to_keep=1))
        logits = out.logits[:, -1, :].float()
        self.metrics.add_time("forward", time.perf_counter() - t0)
        return logits

    def _sample_rows(self, rows: list[_Row], logits: torch.Tensor, now: float, phase: str) -> list[bool]:
        """Sample one token per row; returns per-row 'finished' (incl. failed). A row whose logits are not
        finite, or that cannot be sampled with its parameters, fails alone."""
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        live = []
        for i, r in enumerate(rows):
            if r.req.cancelled:
                continue
            if not finite[i]:
                self._fail(r.req, 400, (
                    f"steering {r.req.steering.label!r} made the activations non-finite (NaN/Inf) at "
                    f"{'the prompt' if phase == 'prompt' else f'generated token {len(r.req.generated)}'}; "
                    "the request was stopped (lower the scale)"), "non_finite_activations")
                continue
            live.append(i)
        if len(live) < len(rows):
            logits = logits.index_select(0, torch.tensor(live, dtype=torch.long, device=logits.device))
        toks = sample(logits, [rows[i].sampler for i in live])
        done = [True] * len(rows)
        for i, tok in zip(live, toks):
            r = rows[i]
            if isinstance(tok, Exception):
                log.warning("request %s: sampling failed: %s: %s", r.req.id, type(tok).__name__, tok)
                self._fail(r.req, 400, f"this request's tokens cannot be sampled with its sampling parameters "
                           f"({type(tok).__name__}: {tok}); the request was stopped", "sampling_failed")
                continue
            r.pending = tok
            done[i] = self._token(r, tok, now)
        return done

    def _step(self) -> None:
        t0 = time.perf_counter()
        if not self._rows and not self._waiting:
            return
        # 1. cancelled requests leave now (rows and queue)
        with self._cv:
            if any(r.cancelled for r in self._waiting):
                for r in [r for r in self._waiting if r.cancelled]:
                    self._finish(r, r.cancel_reason)
                self._waiting = deque(r for r in self._waiting if not r.cancelled)
        if any(r.req.cancelled for r in self._rows):
            self._drop([i for i, r in enumerate(self._rows) if r.req.cancelled])
        # 2-4. admit + prefill + merge
        new = self._admitting = self._admit()
        if new:
            self._prefill(new)
        self._admitting = []
        # 5. one decode step for every row
        if self._rows:
            rows = self._rows
            b = len(rows)
            ids = torch.tensor([[r.pending] for r in rows], device=self.device)
            mask = torch.cat([self._mask, self._mask.new_ones(b, 1)], dim=1)
            pos = torch.tensor([[r.n_cached] for r in rows], device=self.device)
            logits = self._forward(rows, ids, mask, pos, self._cache, "generated")
            self.metrics.observe_batch(b)
            self._mask = mask
            for r in rows:
                r.n_cached += 1
            done = self._sample_rows(rows, logits, time.perf_counter(), "generated")
            if any(done):
                self._drop([i for i, d in enumerate(done) if d])
            self.steps += 1
        if not self._rows:
            self.steerer.release_unused(set(), self.idle_plan_cache)
        dt = time.perf_counter() - t0
        self.metrics.add_time("step", dt)
        self.step_time_ema = 0.9 * self.step_time_ema + 0.1 * dt

    def _prefill(self, new: list[_Row]) -> None:
        p = max(len(r.req.prompt_ids) for r in new)
        ids = torch.full((len(new), p), 0, dtype=torch.long)
        mask = torch.zeros((len(new), p), dtype=torch.long)
        for i, r in enumerate(new):
            n = len(r.req.prompt_ids)
            ids[i, p - n:] = torch.tensor(r.req.prompt_ids)
            mask[i, p - n:] = 1
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        ids, mask, pos = ids.to(self.device), mask.to(self.device), pos.to(self.device)
        cache = _new_cache()
        logits = self._forward(new, ids, mask, pos, cache, "prompt")
        kv = _kv(cache)
        if bool((mask == 0).any()):  # zero the pad columns so masked garbage can never leak as 0 * NaN
            m = mask[:, None, :, None].to(kv[0][0].dtype)
            kv = [(k * m, v * m) for k, v in kv]
        for r in new:
            r.n_cached = len(r.req.prompt_ids)
        done = self._sample_rows(new, logits, time.perf_counter(), "prompt")
        keep = [i for i, d in enumerate(done) if not d]
        if not keep:
            return
        kv, mask = select_rows(kv, mask, keep, [new[i].n_cached for i in keep])
        kv, self._mask = merge_batches(None if self._cache is None else _kv(self._cache), self._mask, kv, mask)
        self._cache = _cache_from(kv)
        self._rows = self._rows + [new[i] for i in keep]

    def _drop(self, idx: list[int]) -> None:
        gone = set(idx)
        for i in idx:
            r = self._rows[i]
            if not r.req.done:
                self._finish(r.req, r.req.cancel_reason)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        rows = [self._rows[i] for i in keep]
        kv, self._mask = select_rows(_kv(self._cache), self._mask, keep, [r.n_cached for r in rows])
        self._cache = None if kv is None else _cache_from(kv)
        self._rows = rows
