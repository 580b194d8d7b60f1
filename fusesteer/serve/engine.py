"""Continuous batching over preallocated KV slots, one plan and one phase per batch row.

One engine thread owns the model. At start it checks the cache contract and warms up (compiles, with
``--compile``) one decode step per batch bucket (:mod:`.forward`). Every iteration it

1. drops cancelled requests (their rows leave the batch at once, their KV slots are free again),
2. admits waiting requests while KV slots are free (``scheduler.admit``: FIFO, with plan-slot back-pressure),
   gives each the lowest free slot, reuses the KV of a shared prompt prefix when the prompt-phase steering
   is the same (:mod:`.prefix`), and makes sure their effective plans are in the plan table (added between
   two forwards: requests in flight are not touched),
3. prefills prompt chunks of at most ``max_prefill_tokens`` tokens in all (chunked prefill: a long prompt takes
   several steps, and running rows decode at every one of them); a row whose prompt shares a prefix with a
   row prefilling in the same step (same prompt steering) waits and then copies that KV instead of computing
   it too; a row whose prompt is complete samples its first token,
4. runs one fixed-shape decode forward over slots ``[0, bucket)`` and samples the next token of each decoding
   row; a row with one prompt token left (a full prefix hit, a one-token prompt, a waiting row that copied
   its prefix after this step's prefill) computes it as one more row of this forward (prompt phase: its
   position is below its prompt length), not in a prefill forward of its own,
5. retires finished rows and keeps busy slots at the bottom (the highest row's KV moves into a hole), so the
   bucket shrinks as rows leave.

Each row carries its own plan (``Steerer.prepare`` routes it) and its own prompt length; position ids are
per row (the number of tokens before the token), so a row's tokens get the same positions, plans and gating
as when the request runs alone. A row whose logits go non-finite fails alone (its slot is zeroed); sampling
(``sampling.py``) is per row too: a row that cannot be sampled with its parameters fails alone.

transformers' own continuous-batching engine (``generate_batch`` / ``ContinuousBatchingManager``) is not
used; see the README's "Server" section for why.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque

import torch

from ..errors import PlanError
from ..runtime.backends.base import model_device
from . import scheduler
from .forward import Chunk, CompileOptions, Forwards
from .metrics import Metrics
from .prefix import PrefixCache, common, prompt_key
from .registry import Steering, effective_plan
from .requests import GenRequest, Row, Status
from .sampling import RowSampler, sample
from .steer import CapacityFull, Steerer

log = logging.getLogger("fusesteer.serve")


class EngineStopped(RuntimeError):
    """The engine is not taking requests (shutting down, or a tensor-parallel rank failed)."""


class QueueFull(RuntimeError):
    def __init__(self, retry_after: float):
        super().__init__("the request queue is full")
        self.retry_after = retry_after


class Engine:
    def __init__(self, model, steerer: Steerer, metrics: Metrics | None = None, max_batch: int = 32,
                 max_queue: int = 256, max_prefill_tokens: int = 4096, max_len: int = 2048,
                 compile: CompileOptions | None = None, buckets=None, prefix_cache: bool = True, channel=None,
                 on_fatal=None):
        """``channel``: this is rank 0 of a tensor-parallel server (:mod:`.parallel`): every model call is sent
        to the other ranks first, and a failed step is fatal (``on_fatal()`` runs after every request failed)."""
        self.model = model
        self.steerer = steerer
        self.metrics = metrics or Metrics()
        self.max_batch = int(max_batch)  # KV slots = rows decoded together
        self.max_queue = int(max_queue)
        self.max_prefill_tokens = int(max_prefill_tokens)
        self.device = model_device(model)
        fw_args = (model, steerer, self.max_batch, int(max_len))
        if channel is None:
            self.fw = Forwards(*fw_args, buckets=buckets, compile=compile)
        else:
            from .parallel import LeaderForwards

            self.fw = LeaderForwards(*fw_args, buckets=buckets, compile=compile, channel=channel)
        self.channel, self.on_fatal = channel, on_fatal
        self.failure: str | None = None  # why the engine stopped for good (tensor-parallel rank failure)
        self.prefix = PrefixCache(self.max_batch) if prefix_cache else None
        self._cv = threading.Condition()
        self._waiting: deque[GenRequest] = deque()  # Status.QUEUED
        self._rows: list[Row] = []  # slot holders in admission order: ADMITTED (prefilling) and RUNNING
        self._slots: list[Row | None] = [None] * self.max_batch
        self._preload: list[tuple] = []  # (Steering, effective plan or None)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self.steps = 0
        self.step_time_ema = 0.05

    # ---- public (any thread) ---------------------------------------------------------------------
    def start(self) -> Engine:
        """Start the engine thread; returns once its KV cache is allocated and every decode bucket warmed up."""
        self._thread = threading.Thread(target=self._run, name="fusesteer-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self.fw.close()
        for req in list(self._waiting) + [r.req for r in self._rows]:
            self._fail(req, 503, "the server is shutting down", "shutting_down")
        self._waiting.clear()
        self._rows = []

    def submit(self, req: GenRequest) -> None:
        with self._cv:
            if self._stop:
                raise EngineStopped(self.failure or "the server is shutting down")
            if not scheduler.queue_has_room(len(self._waiting), len(self._rows), self.max_batch, self.max_queue):
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
        """Requests holding a KV slot (prefilling or decoding)."""
        return len(self._rows)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def recompiles(self) -> int:
        """torch.compile recompilations since the warm-up (0 unless a compiled decode step saw a new shape)."""
        return self.fw.recompiles_since_warmup()

    # ---- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            try:
                self.fw.start()
            except BaseException as e:  # noqa: BLE001 - handed to start()
                self._start_error = e
                self._ready.set()
                return
            self.metrics.set_gauge("kv_cache_bytes", self.fw.cache.nbytes())
            self._ready.set()
            while True:
                with self._cv:
                    idle = not self._waiting and not self._rows and not self._preload
                    if idle and not self._stop:
                        self._cv.wait(0.5)
                    if self._stop:
                        return
                try:
                    if idle:
                        self.fw.tick()
                        continue
                    if self._preload:
                        self._do_preloads()
                    self._step()
                except Exception as e:
                    if self.channel is not None:
                        self._fatal(e)
                        return
                    log.exception("engine step failed")
                    for r in self._rows:
                        self._fail(r.req, 500, f"internal error in the generation step: {type(e).__name__}: {e}",
                                   "internal_error")
                        self.fw.zero(r.slot)
                    self._rows, self._slots = [], [None] * self.max_batch
                    if self.prefix is not None:
                        self.prefix.clear()
                self._gauges()

    def _fatal(self, e: BaseException) -> None:
        """A tensor-parallel step failed: the ranks no longer run the same forward, so nothing more can run."""
        self.failure = (f"a tensor-parallel rank failed or stopped answering ({type(e).__name__}: {e}); "
                        "the server is stopping")
        log.critical("fusesteer serve: %s (exit code 1)", self.failure)
        with self._cv:
            self._stop = True
            reqs = list(self._waiting) + [r.req for r in self._rows]
            self._waiting.clear()
            self._rows = []
        for req in reqs:
            self._fail(req, 503, self.failure, "rank_failed")
        if self.on_fatal is not None:
            self.on_fatal()

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
        m.set_gauge("compile_recompiles", self.recompiles)

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

    # ---- admission -------------------------------------------------------------------------------
    def _admit(self) -> list[Row]:
        """Take the waiting requests that :func:`scheduler.admit` lets start now (a free KV slot each; chunked
        prefill bounds the prefill work, so admission does not), make their plans available, give them slots."""
        limits = scheduler.Limits(self.max_batch, sys.maxsize, self.steerer.capacity)
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
            plan = None
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
            if key is not None:
                plan = self.steerer.held.get(key, plan)
            n = len(req.prompt_ids)
            row = Row(req, key, n, 0, -1, RowSampler(req.sampling, req.prompt_ids, req.eos_ids),
                      prefix_key=prompt_key(key, plan))
            self._take_slot(row)
            new.append(row)
            self.metrics.count_tokens(req.steering.label, "prompt", n)
        if back:
            with self._cv:
                for req in reversed(back):
                    req.status = Status.QUEUED
                    self._waiting.appendleft(req)
        return new

    def _take_slot(self, row: Row) -> None:
        """The lowest free slot (busy slots stay at the bottom: the smallest decode bucket), with the KV of the
        longest cached prefix of the same prompt steering copied in (or already there)."""
        free = [i for i, r in enumerate(self._slots) if r is None]
        slot = row.slot = free[0]
        self._slots[slot] = row
        if self.prefix is None:
            return
        src, m = self.prefix.lookup(row.req.prompt_ids, row.prefix_key, self._live_prefixes())
        if src == slot:  # the prefix this row wants is the one its slot holds: reused in place
            self.prefix.forget(slot)
        else:
            self._park(slot, free)
            if m > 0:
                self.fw.copy(src, slot, m)
        row.n_cached = m

    def _park(self, slot: int, free: list[int]) -> None:
        """``slot`` is about to be written: the cached prefix it holds (if any) moves to a free slot higher up."""
        moved = self.prefix.move_out(slot, free)
        if moved is not None:
            self.fw.copy(slot, moved[0], moved[1])

    def _live_prefixes(self, but: Row | None = None) -> list:
        """Running rows' prompts as prefix sources: (slot, prompt tokens in its KV, prompt steering key)."""
        return [(r.slot, r.req.prompt_ids[:min(r.n_cached, r.prompt_len)], r.prefix_key) for r in self._rows
                if r is not but]

    def _catch_up(self, row: Row) -> None:
        """A prefilling row copies a longer shared prompt prefix than it holds, now in another row's KV (one that
        was admitted with it and prefilled the prefix first: see :meth:`_waits`)."""
        src, m = self.prefix.lookup(row.req.prompt_ids, row.prefix_key, self._live_prefixes(but=row))
        if m > row.n_cached and src != row.slot:
            self.fw.copy(src, row.slot, m)
            row.n_cached = m

    def _waits(self, row: Row, computing: list[Row]) -> bool:
        """In-batch prefix sharing: ``row`` waits a step when a row prefilling in this step computes a prompt
        prefix it shares (same prompt steering) that is at least half of what ``row`` has left to compute; it
        then copies that KV (:meth:`_catch_up`) instead of computing the same tokens beside it. Requests with the
        same system prompt or the same question, arriving together, compute it once."""
        left = row.prompt_len - row.n_cached
        for c in computing:
            if c.prefix_key != row.prefix_key:
                continue
            shared = min(common(row.req.prompt_ids, c.req.prompt_ids), row.prompt_len - 1)
            gain = shared - row.n_cached
            if c.n_cached < shared and gain >= max(self.prefix.min_tokens, (left + 1) // 2):
                return True
        return False

    # ---- one step --------------------------------------------------------------------------------
    def _forward(self, what: str, arg):
        t0 = time.perf_counter()
        out = self.fw.prefill(arg) if what == "prefill" else self.fw.decode(arg)
        self.metrics.add_time("forward", time.perf_counter() - t0)
        return out

    def _live(self, rows: list[Row], logits: torch.Tensor, phase: str) -> list[int]:
        """Indices of ``rows`` whose logits are finite; the others fail alone."""
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        live = []
        for i, r in enumerate(rows):
            if r.req.cancelled:
                continue
            if not finite[i]:
                where = "the prompt" if phase == "prompt" or not r.req.generated else \
                    f"generated token {len(r.req.generated)}"
                self._fail(r.req, 400, (
                    f"steering {r.req.steering.label!r} made the activations non-finite (NaN/Inf) at {where}; "
                    "the request was stopped (lower the scale)"), "non_finite_activations")
                self.fw.zero(r.slot, min(self.fw.max_len + 1, r.n_cached + 1))
                continue
            live.append(i)
        return live

    def _sample_rows(self, rows: list[Row], logits: torch.Tensor, now: float, phase: str) -> list[bool]:
        """Sample one token per row; returns per-row 'finished' (incl. failed). A row whose logits are not
        finite, or that cannot be sampled with its parameters, fails alone."""
        live = self._live(rows, logits, phase)
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
        self._retire([r for r in self._rows if r.req.cancelled])
        # 2. admit: a KV slot each
        self._rows = self._rows + self._admit()
        # 3. prompt chunks, under the prefill token budget
        if any(r.prefilling for r in self._rows):
            self._prefill()
        # 4. one decode step for every decoding row, and for each row with one prompt token left (a full prefix
        # hit, or its last chunk): that token is one more query row of the decode forward, not a prefill forward
        dec = [r for r in self._rows if not r.req.done and r.prompt_len - r.n_cached <= 1]
        if dec:
            by_slot: list = [None] * (max(r.slot for r in self._rows) + 1)
            first = [r.prefilling for r in dec]
            for r, f in zip(dec, first):
                if f:
                    self._count_prefix(r)
                tok = r.req.prompt_ids[r.n_cached] if f else r.pending
                by_slot[r.slot] = (tok, r.n_cached, r.key, r.prompt_len)
            logits, bucket = self._forward("decode", by_slot)
            idx = torch.tensor([r.slot for r in dec], dtype=torch.long, device=logits.device)
            logits = logits.index_select(0, idx).float()
            self.metrics.observe_batch(len(dec), bucket)
            for r in dec:
                r.n_cached += 1
            done = self._sample_rows(dec, logits, time.perf_counter(), "generated")
            for r, f, d in zip(dec, first, done):
                if f and not d:
                    r.req.status = Status.RUNNING
            self._retire([r for r, d in zip(dec, done) if d])
            self.steps += 1
        dt = time.perf_counter() - t0
        self.metrics.add_time("step", dt)
        self.step_time_ema = 0.9 * self.step_time_ema + 0.1 * dt

    def _prefill(self) -> None:
        budget = self.max_prefill_tokens
        chunks: list[Chunk] = []
        rows: list[Row] = []
        waited: list[Row] = []  # rows that copy what this forward computes, once it has (then maybe decode now)
        for r in self._rows:
            if not r.prefilling:
                continue
            if self.prefix is not None and not r.prefix_counted:  # it has not computed a prompt token yet
                self._catch_up(r)
                if self._waits(r, rows):
                    waited.append(r)
                    continue
            left = r.prompt_len - r.n_cached
            if left == 1 or budget <= 0:  # the last prompt token goes with the decode step
                continue
            self._count_prefix(r)
            c = min(left, budget)
            chunks.append(Chunk(r.slot, r.req.prompt_ids[r.n_cached:r.n_cached + c], r.n_cached, r.key, r.prompt_len))
            rows.append(r)
            budget -= c
        if not chunks:
            return
        logits = self._forward("prefill", chunks).float()
        for r, c in zip(rows, chunks):
            r.n_cached += len(c.tokens)
        live = set(self._live(rows, logits, "prompt"))
        fail = [r for i, r in enumerate(rows) if i not in live]
        ready = [i for i in live if not rows[i].prefilling]
        if ready:
            sel = torch.tensor(ready, dtype=torch.long, device=logits.device)
            got = [rows[i] for i in ready]
            done = self._sample_rows(got, logits.index_select(0, sel), time.perf_counter(), "prompt")
            for r, d in zip(got, done):
                if d:
                    fail.append(r)
                else:
                    r.req.status = Status.RUNNING
        self._retire(fail)
        for r in waited:
            if not r.req.done:
                self._catch_up(r)

    def _count_prefix(self, row: Row) -> None:
        """Count a row's prompt tokens as prefix-cache hits / misses, once: when it starts computing them."""
        if not row.prefix_counted:
            row.prefix_counted = True
            self.metrics.count_prefix(row.n_cached, row.prompt_len)

    def _retire(self, rows: list[Row]) -> None:
        """Finished, failed or cancelled rows leave: their slots are free (a finished prompt stays there as a
        cached prefix), and the highest busy rows move down into the holes."""
        if not rows:
            return
        gone = set(map(id, rows))
        if all(id(r) in gone for r in self._rows):  # idle next: leave the model routed as one unsteered row (as
            self.steerer.prepare([None], [0])  # a lone request leaves it) before the last client hears back
        for r in rows:
            if not r.req.done:
                self._finish(r.req, r.req.cancel_reason)
            self._slots[r.slot] = None
            if self.prefix is not None and r.req.finish_reason != "error":
                self.prefix.offer(r.slot, r.req.prompt_ids[:min(r.n_cached, r.prompt_len)], r.prefix_key)
        self._rows = [r for r in self._rows if id(r) not in gone]
        self._compact()

    def _compact(self) -> None:
        while True:
            busy = [i for i, r in enumerate(self._slots) if r is not None]
            free = [i for i, r in enumerate(self._slots) if r is None]
            if not busy or not free or free[0] > busy[-1]:
                return
            src, row = busy[-1], self._slots[busy[-1]]
            dst = free[0]
            if self.prefix is not None:
                self._park(dst, [f for f in free if f > dst])
            self.fw.copy(src, dst, row.n_cached)
            self._slots[dst], self._slots[src] = row, None
            row.slot = dst
