"""Assemble and run a server: model + plan registry + steering runtime + engine + HTTP app on uvicorn."""

from __future__ import annotations

import logging
import os
import threading
import time

from ..errors import FuseSteerError
from .app import ServerConfig, create_app
from .engine import Engine
from .forward import CompileOptions
from .metrics import Metrics
from .registry import DEFAULT_MAX_PLAN_BYTES, DEFAULT_MAX_PLAN_ENTRIES, PlanRegistry
from .steer import Steerer
from .watch import PlanWatcher

log = logging.getLogger("fusesteer.serve")

DEFAULT_KV_CACHE_TOKENS = 32768  # rows x tokens of the preallocated KV cache when --kv-cache-tokens is not given


class ServerConfigError(FuseSteerError, ValueError):
    """A server option that cannot work (raised before anything is loaded or served)."""


def check_options(**opts) -> None:
    """Refuse options that would give a server that cannot serve (each named with what it must be)."""
    at_least = {"max_batch": 1, "max_queue": 0, "max_tokens": 1, "max_model_len": 2, "plan_slots": 1,
                "max_plan_bytes": 1, "max_plan_entries": 1, "max_prefill_tokens": 1, "port": 0,
                "kv_cache_tokens": 2}
    for name, v in opts.items():
        if v is None and name in ("max_model_len", "plan_slots", "kv_cache_tokens"):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(v, bool) or not isinstance(v, int):
            raise ServerConfigError(f"{flag} must be an integer, got {v!r}")
        if v < at_least[name]:
            raise ServerConfigError(f"{flag} must be at least {at_least[name]}, got {v}")
    if opts.get("port", 0) > 65535:
        raise ServerConfigError(f"--port must be at most 65535, got {opts['port']}")


class Server:
    """Everything one ``fusesteer serve`` runs. ``start()`` serves on a background thread (tests, benchmarks);
    ``run()`` serves in the foreground (the CLI)."""

    def __init__(self, model, tokenizer, model_name: str, plans_dir=None, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, max_batch: int = 32, max_queue: int = 256, max_tokens: int = 512,
                 max_model_len: int | None = None, backend: str = "auto", plan_slots: int | None = None,
                 max_plan_bytes: int = DEFAULT_MAX_PLAN_BYTES, max_prefill_tokens: int = 512,
                 max_plan_entries: int = DEFAULT_MAX_PLAN_ENTRIES, kv_cache_tokens: int | None = None,
                 compile: bool | None = None, compile_backend: str = "inductor", decode_buckets=None,
                 prefix_cache: bool = True, watch: bool = False, watch_interval: float = 1.0, channel=None):
        """``kv_cache_tokens``: the preallocated KV cache, rows x tokens per row (default
        ``DEFAULT_KV_CACHE_TOKENS``): ``max_batch`` rows of ``max_model_len`` tokens when it holds them, fewer rows
        otherwise; without ``max_model_len`` each of ``max_batch`` rows gets its share (at most the model's
        context). ``compile``: decode under ``torch.compile`` (None: on CUDA only). ``channel``: this process is
        rank 0 of a tensor-parallel server (:func:`fusesteer.serve.parallel.init`); the other ranks run
        :func:`~fusesteer.serve.parallel.follow`."""
        from ..runtime.plan import ModelSpec

        check_options(max_batch=max_batch, max_queue=max_queue, max_tokens=max_tokens, max_model_len=max_model_len,
                      plan_slots=plan_slots, max_plan_bytes=max_plan_bytes, max_plan_entries=max_plan_entries,
                      max_prefill_tokens=max_prefill_tokens, port=port, kv_cache_tokens=kv_cache_tokens)
        self.model, self.tokenizer = model, tokenizer
        self.host, self.port = host, port
        self.metrics = Metrics()
        self.registry = PlanRegistry(ModelSpec.from_model(model), max_plan_bytes=max_plan_bytes,
                                     max_plan_entries=max_plan_entries)
        if watch and (plans_dir is None or not watch_interval > 0):
            raise ServerConfigError(f"--watch needs --plans DIR and a positive --watch-interval ({watch_interval!r})")
        self.watcher = PlanWatcher(self.registry, plans_dir, watch_interval) if watch else None  # runs with the engine
        if plans_dir is not None:  # once, or then watched: the same rules (fusesteer.serve.watch)
            recs = (self.watcher or PlanWatcher(self.registry, plans_dir)).load()
            log.info("loaded %d plan(s) from %s", sum(r.plan is not None for r in recs), plans_dir)
        ctx = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        kv = kv_cache_tokens or DEFAULT_KV_CACHE_TOKENS
        max_len = min(ctx, max_model_len or max(2, kv // max_batch))
        rows = min(max_batch, kv // max_len)
        if rows < 1:
            raise ServerConfigError(f"--kv-cache-tokens {kv} cannot hold one row of --max-model-len {max_len} tokens")
        if rows < max_batch:
            log.warning("--kv-cache-tokens %d holds %d rows of %d tokens: --max-batch %d lowered to %d", kv, rows,
                        max_len, max_batch, rows)
        self.config = ServerConfig(model_name=model_name, max_tokens=max_tokens, max_model_len=max_len,
                                   api_key=api_key, world_size=channel.world if channel is not None else 1)
        slots = plan_slots if plan_slots is not None else max_batch + 8
        if channel is None:
            self.steerer = Steerer(model, backend=backend, capacity=max(slots, max_batch))
        else:
            from .parallel import LeaderSteerer

            self.steerer = LeaderSteerer(model, channel, backend=backend, capacity=max(slots, max_batch))
        self._preload_registry(slots)
        on_cuda = next(model.parameters()).device.type == "cuda"
        copts = CompileOptions(enabled=on_cuda if compile is None else bool(compile), backend=compile_backend)
        self.engine = Engine(model, self.steerer, self.metrics, max_batch=rows, max_queue=max_queue,
                             max_prefill_tokens=max_prefill_tokens, max_len=max_len, compile=copts,
                             buckets=decode_buckets, prefix_cache=prefix_cache, channel=channel,
                             on_fatal=self._rank_failed if channel is not None else None)
        self.app = create_app(self.engine, self.registry, tokenizer, self.config, self.metrics)
        self._uv = None
        self._thread = None

    def _rank_failed(self) -> None:
        """A tensor-parallel rank failed (the engine logged it and failed every request with 503): give the
        answers a moment to leave, then end the process with exit code 1 (a clean shutdown could wait forever
        on the ranks that are gone)."""
        threading.Timer(1.0, os._exit, (1,)).start()

    def _preload_registry(self, slots: int) -> None:
        """Write the folder's plans (scale 1) into the plan table before serving, as many as there are slots: a
        request naming one of them then starts without waiting for add_plan."""
        from .registry import Steering, effective_plan

        t0 = time.perf_counter()
        n = 0
        for name in self.registry.names()[:slots]:
            rec = self.registry.get(name)
            if rec is None or rec.plan is None:
                continue
            st = Steering(((rec, 1.0),))
            try:
                self.steerer.ensure({st.key: effective_plan(st)}, set())
                n += 1
            except Exception as e:  # noqa: BLE001 - best effort
                log.warning("could not preload plan %r: %s", name, e)
        if n:
            log.info("preloaded %d plan(s) into the plan table in %.1f s", n, time.perf_counter() - t0)

    def _uvicorn(self):
        import uvicorn

        cfg = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning", access_log=False,
                             timeout_graceful_shutdown=2, lifespan="off")
        return uvicorn.Server(cfg)

    def start(self, timeout: float = 30.0) -> Server:
        """Serve on a background thread; returns once listening (``self.port`` is the bound port)."""
        self.engine.start()
        if self.watcher is not None:
            self.watcher.start(self.engine)
        self._uv = self._uvicorn()
        self._thread = threading.Thread(target=self._uv.run, name="fusesteer-http", daemon=True)
        self._thread.start()
        t0 = time.monotonic()
        while not self._uv.started:
            if not self._thread.is_alive() or time.monotonic() - t0 > timeout:
                self.engine.stop()
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        self.port = self._uv.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        if self._uv is not None:
            self._uv.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._close()

    def _close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.engine.stop()
        self.steerer.close()
        self.app.state.work.shutdown(wait=False, cancel_futures=True)

    def run(self) -> None:
        self.engine.start()
        if self.watcher is not None:
            self.watcher.start(self.engine)
        try:
            self._uvicorn().run()
        finally:
            self._close()
