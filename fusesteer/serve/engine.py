"""Continuous batching over Hugging Face's KV cache, one plan and one phase per batch row.

One engine thread owns the model. Every iteration it

1. drops cancelled requests (their rows leave the batch at once),
2. admits waiting requests (``scheduler.admit``: FIFO while rows are free, under the prefill token cap, with
   plan-slot back-pressure), makes sure their effective plans are in the plan table (added between two
   forwards: requests in flight are not touched),
3. prefills the admitted requests in one left-padded forward (prompt phase) and samples their first token,
4. merges their KV cache into the running batch (``kv.Batch``; left padding, so every row ends at the same
   column),
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

import logging
import threading
import time
from collections import deque

import torch

from ..errors import PlanError
from ..runtime.backends.base import model_device
from ..runtime.compat import with_cache
from . import scheduler
from .kv import Batch, new_cache
from .metrics import Metrics
from .registry import Steering, effective_plan
from .requests import GenRequest, Row, Status
from .sampling import RowSampler, sample
from .steer import CapacityFull, Steerer

log = logging.getLogger("fusesteer.serve")


class QueueFull(RuntimeError):
    def __init__(self, retry_after: float):
        super().__init__("the request queue is full")
        self.retry_after = retry_after


class Engine:
    def __init__(self, model, steerer: Steerer, metrics: Metrics | None = None, max_batch: int = 32,
                 max_queue: int = 256, max_prefill_tokens: int = 4096):
        self.model = model
        self.steerer = steerer
        self.metrics = metrics or Metrics()
        self.max_batch = int(max_batch)
        self.max_queue = int(max_queue)
        self.max_prefill_tokens = int(max_prefill_tokens)
        self.device = model_device(model)
        self._cv = threading.Condition()
        self._waiting: deque[GenRequest] = deque()  # Status.QUEUED
        self._admitting: list[Row] = []  # Status.ADMITTED (failed too if a step breaks)
        self._rows: list[Row] = []  # Status.RUNNING, in the order of the batch's cache rows
        self._batch = Batch()
        self._preload: list[tuple] = []  # (Steering, effective plan or None)
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
            busy = len(self._rows) + len(self._admitting)
            if not scheduler.queue_has_room(len(self._waiting), busy, self.max_batch, self.max_queue):
                raise QueueFull(scheduler.retry_after(self.step_time_ema))
            req.status = Status.QUEUED
            self._waiting.append(req)
            self._cv.notify_all()
        self._gauges()

    def preload(self, steering: Steering, plan=None) -> None:
        """Put a plan into the plan table at the next step boundary (so its first request does not pay for it);
        ``plan``: the steering's effective plan, if the caller composed it already."""
        with self._cv:
            self._preload.append((steering, plan))
            self._cv.notify_all()

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
                    self._rows, self._admitting = [], []
                    self._batch.clear()
                self._gauges()

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
            if req.cancel_reason is None:
                req.cancel()

    def _fail(self, req: GenRequest, status: int, message: str, code: str) -> None:
        if req.done:
            return
        req.status = Status.FINISHED
        req.finish_reason = "error"
        self.metrics.count_request(req.endpoint, req.steering.label, code)
        self._emit(req, ("error", status, message, code))

    def _finish(self, req: GenRequest, reason: str) -> None:
        if req.done:
            return
        req.status = Status.FINISHED
        req.finish_reason = reason
        self.metrics.count_request(req.endpoint, req.steering.label, "cancelled" if reason == "cancelled" else "ok")
        self._emit(req, ("finish", reason))

    def _token(self, row: Row, tok: int, now: float) -> bool:
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

    def _admit(self) -> list[Row]:
        """Take the waiting requests that :func:`scheduler.admit` lets start now; make their plans available."""
        limits = scheduler.Limits(self.max_batch, self.max_prefill_tokens, self.steerer.capacity)
        with self._cv:
            queue = list(self._waiting)
            adm = scheduler.admit([scheduler.Waiting(len(r.prompt_ids), r.steering.key, r.cancelled) for r in queue],
                                  len(self._rows), self._in_use(), limits)
            for i in adm.drop:
                self._finish(queue[i], queue[i].cancel_reason)
            if adm.take or adm.drop:
                gone = set(adm.take) | set(adm.drop)
                self._waiting = deque(r for i, r in enumerate(queue) if i not in gone)
        new: list[Row] = []
        back: list[GenRequest] = []
        for req in (queue[i] for i in adm.take):
            req.status = Status.ADMITTED
            key = req.steering.key
            if key is not None and not self.steerer.has(key):
                try:
                    plan = req.plan if req.plan is not None else effective_plan(req.steering)
                    self.steerer.ensure({key: plan}, self._in_use() | {r.key for r in new if r.key})
                except CapacityFull:  # the plan table refused it: try again once rows free up, in its place
                    back.append(req)
                    continue
                except PlanError as e:
                    self._fail(req, 400, f"steering {req.steering.label!r} cannot be applied: {e}", "invalid_steering")
                    continue
            elif key is not None:
                self.steerer.touch(key)
            n = len(req.prompt_ids)
            new.append(Row(req, key, n, 0, -1, RowSampler(req.sampling, req.prompt_ids, req.eos_ids)))
            self.metrics.count_tokens(req.steering.label, "prompt", n)
        if back:
            with self._cv:
                for req in reversed(back):
                    req.status = Status.QUEUED
                    self._waiting.appendleft(req)
        return new

    def _forward(self, rows: list[Row], input_ids, mask, pos, cache):
        self.steerer.prepare([r.key for r in rows], [r.prompt_len for r in rows])
        t0 = time.perf_counter()
        out = self.model(**with_cache(self.model, cache, input_ids=input_ids, attention_mask=mask, position_ids=pos,
                                      use_cache=True, logits_to_keep=1))
        logits = out.logits[:, -1, :].float()
        self.metrics.add_time("forward", time.perf_counter() - t0)
        return logits

    def _sample_rows(self, rows: list[Row], logits: torch.Tensor, now: float, phase: str) -> list[bool]:
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
            ids = torch.tensor([[r.pending] for r in rows], device=self.device)
            mask = self._batch.next_mask()
            pos = torch.tensor([[r.n_cached] for r in rows], device=self.device)
            logits = self._forward(rows, ids, mask, pos, self._batch.cache)
            self.metrics.observe_batch(len(rows))
            self._batch.mask = mask
            for r in rows:
                r.n_cached += 1
            done = self._sample_rows(rows, logits, time.perf_counter(), "generated")
            if any(done):
                self._drop([i for i, d in enumerate(done) if d])
            self.steps += 1
        dt = time.perf_counter() - t0
        self.metrics.add_time("step", dt)
        self.step_time_ema = 0.9 * self.step_time_ema + 0.1 * dt

    def _prefill(self, new: list[Row]) -> None:
        p = max(len(r.req.prompt_ids) for r in new)
        ids = torch.full((len(new), p), 0, dtype=torch.long)
        mask = torch.zeros((len(new), p), dtype=torch.long)
        for i, r in enumerate(new):
            n = len(r.req.prompt_ids)
            ids[i, p - n:] = torch.tensor(r.req.prompt_ids)
            mask[i, p - n:] = 1
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        ids, mask, pos = ids.to(self.device), mask.to(self.device), pos.to(self.device)
        cache = new_cache()
        logits = self._forward(new, ids, mask, pos, cache)
        for r in new:
            r.n_cached = len(r.req.prompt_ids)
        done = self._sample_rows(new, logits, time.perf_counter(), "prompt")
        keep = [i for i, d in enumerate(done) if not d]
        if not keep:
            return
        self._batch.append(cache, mask, keep, [new[i].n_cached for i in keep])
        for i in keep:
            new[i].req.status = Status.RUNNING
        self._rows = self._rows + [new[i] for i in keep]

    def _drop(self, idx: list[int]) -> None:
        gone = set(idx)
        for i in idx:
            r = self._rows[i]
            if not r.req.done:
                self._finish(r.req, r.req.cancel_reason)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        rows = [self._rows[i] for i in keep]
        self._batch.keep(keep, [r.n_cached for r in rows])
        self._rows = rows
