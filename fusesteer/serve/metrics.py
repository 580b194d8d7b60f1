"""The server's Prometheus metrics, kept and written by ``prometheus_client`` in a registry of the server's own
(several servers in one process do not share counters).

The exposition has the series the hand-written one had: same names, labels, help texts and bucket bounds. What
``prometheus_client`` writes differently: numbers as floats (``2.0``, not ``2``), bucket bounds in Go's float
form (``le="1.0"``, not ``le="1"``; Prometheus 3 normalizes both to the same series), and series in the order
they were first written rather than sorted. Its ``*_created`` samples (creation timestamps) are left out, so
no series is added.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

GAUGES = {"active_requests": "Requests holding a batch row.",
          "compile_recompiles": "torch.compile recompilations since the decode warm-up (0 is the promise: new "
                                "plans, scales, routings and phases never recompile).",
          "kv_cache_bytes": "Preallocated KV cache memory (fixed for the server's lifetime).",
          "prefix_cache_hit_rate": "Prompt tokens whose KV came from the prefix cache, over all prompt tokens.",
          "plans_attached": "Effective plans held in the model's plan table.",
          "plans_loaded": "Plans in the registry.",
          "queued_requests": "Requests waiting for a batch row."}


class _WithoutCreated:
    """A registry's metrics without their ``*_created`` samples."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self):
        for metric in self.registry.collect():  # fresh objects on every collect: safe to trim
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self._requests = Counter("fusesteer_requests", "Finished requests by endpoint, steering plan and outcome.",
                                 ("endpoint", "plan", "status"), registry=r)
        self._tokens = Counter("fusesteer_tokens", "Prompt and generated tokens by steering plan.", ("plan", "kind"),
                               registry=r)
        self._gauges = {g: Gauge(f"fusesteer_{g}", help_, registry=r) for g, help_ in GAUGES.items()}
        self._seconds = Counter("fusesteer_engine_seconds", "Engine thread time: whole steps, and model forwards "
                                "within them (the rest is scheduling, KV bookkeeping and sampling).", ("part",),
                                registry=r)
        for part in ("forward", "step"):
            self._seconds.labels(part)  # both series exist (at 0) before the first step
        self._prefix = Counter("fusesteer_prefix_cache_tokens", "Prompt tokens by prefix cache result: 'hit' (KV "
                               "copied from a prompt with the same prompt steering) or 'miss' (prefilled).",
                               ("result",), registry=r)
        self._batch = Histogram("fusesteer_batch_size", "Rows decoding in each decode forward.",
                                buckets=BATCH_BUCKETS, registry=r)
        self._bucket = Histogram("fusesteer_decode_bucket_rows", "Rows each decode forward runs at (its bucket: the "
                                 "decoding rows plus the idle or prefilling rows below the highest one).",
                                 buckets=BATCH_BUCKETS, registry=r)
        self._ttft = Histogram("fusesteer_time_to_first_token_seconds", "Arrival to first generated token.",
                               buckets=LATENCY_BUCKETS, registry=r)
        self._itl = Histogram("fusesteer_inter_token_latency_seconds", "Time between consecutive tokens.",
                              buckets=LATENCY_BUCKETS, registry=r)

    # ---- events (any thread) ---------------------------------------------------------------------
    def add_time(self, what: str, s: float) -> None:
        self._seconds.labels(what).inc(s)

    def count_request(self, endpoint: str, plan: str, status: str) -> None:
        self._requests.labels(endpoint, plan, status).inc()

    def count_tokens(self, plan: str, kind: str, n: int) -> None:
        if n > 0:
            self._tokens.labels(plan, kind).inc(n)

    def count_prefix(self, hit: int, prompt: int) -> None:
        self._prefix.labels("hit").inc(max(0, hit))
        self._prefix.labels("miss").inc(max(0, prompt - hit))
        h = self.value("fusesteer_prefix_cache_tokens_total", result="hit")
        total = h + self.value("fusesteer_prefix_cache_tokens_total", result="miss")
        self.set_gauge("prefix_cache_hit_rate", h / total if total else 0.0)

    def observe_ttft(self, s: float) -> None:
        self._ttft.observe(s)

    def observe_itl(self, s: float) -> None:
        self._itl.observe(s)

    def observe_batch(self, n: int, bucket: int) -> None:
        self._batch.observe(n)
        self._bucket.observe(bucket)

    def set_gauge(self, name: str, v: float) -> None:
        self._gauges[name].set(v)

    # ---- reading ---------------------------------------------------------------------------------
    def value(self, sample: str, **labels) -> float:
        """One sample's value (0 if it has not been written), e.g. ``value("fusesteer_batch_size_count")`` or
        ``value("fusesteer_requests_total", endpoint="chat", plan="none", status="ok")``."""
        v = self.registry.get_sample_value(sample, {k: str(x) for k, x in labels.items()})
        return 0.0 if v is None else v

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        return generate_latest(_WithoutCreated(self.registry)).decode()
