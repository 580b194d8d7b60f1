"""Prometheus text-format metrics for the server, with no dependency: counters, gauges and histograms."""

from __future__ import annotations

import threading
from bisect import bisect_left

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple, values: tuple) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_esc(v)}"' for n, v in zip(names, values)) + "}"


class _Hist:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.n += 1


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple, int] = {}  # (endpoint, plan, status) -> n
        self.tokens: dict[tuple, int] = {}  # (plan, kind) -> n
        self.ttft = _Hist(LATENCY_BUCKETS)
        self.itl = _Hist(LATENCY_BUCKETS)
        self.batch = _Hist(BATCH_BUCKETS)
        self.gauges: dict[str, float] = {"active_requests": 0, "queued_requests": 0, "plans_loaded": 0,
                                         "plans_attached": 0}
        self.steps = 0
        self.seconds: dict[str, float] = {"step": 0.0, "forward": 0.0}

    def add_time(self, what: str, s: float) -> None:
        with self._lock:
            self.seconds[what] = self.seconds.get(what, 0.0) + s

    def count_request(self, endpoint: str, plan: str, status: str) -> None:
        with self._lock:
            k = (endpoint, plan, status)
            self.requests[k] = self.requests.get(k, 0) + 1

    def count_tokens(self, plan: str, kind: str, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            k = (plan, kind)
            self.tokens[k] = self.tokens.get(k, 0) + n

    def observe_ttft(self, s: float) -> None:
        with self._lock:
            self.ttft.observe(s)

    def observe_itl(self, s: float) -> None:
        with self._lock:
            self.itl.observe(s)

    def observe_batch(self, n: int) -> None:
        with self._lock:
            self.batch.observe(n)
            self.steps += 1

    def set_gauge(self, name: str, v: float) -> None:
        with self._lock:
            self.gauges[name] = v

    def render(self) -> str:
        out: list[str] = []
        with self._lock:
            out += ["# HELP fusesteer_requests_total Finished requests by endpoint, steering plan and outcome.",
                    "# TYPE fusesteer_requests_total counter"]
            for (ep, plan, st), n in sorted(self.requests.items()):
                out.append(f"fusesteer_requests_total{_labels(('endpoint', 'plan', 'status'), (ep, plan, st))} {n}")
            out += ["# HELP fusesteer_tokens_total Prompt and generated tokens by steering plan.",
                    "# TYPE fusesteer_tokens_total counter"]
            for (plan, kind), n in sorted(self.tokens.items()):
                out.append(f"fusesteer_tokens_total{_labels(('plan', 'kind'), (plan, kind))} {n}")
            helps = {"active_requests": "Requests holding a batch row.",
                     "queued_requests": "Requests waiting for a batch row.",
                     "plans_loaded": "Plans in the registry.",
                     "plans_attached": "Effective plans held in the model's plan table."}
            for g, v in sorted(self.gauges.items()):
                out += [f"# HELP fusesteer_{g} {helps.get(g, g)}", f"# TYPE fusesteer_{g} gauge",
                        f"fusesteer_{g} {v:g}"]
            out += ["# HELP fusesteer_engine_seconds_total Engine thread time: whole steps, and model forwards "
                    "within them (the rest is scheduling, KV bookkeeping and sampling).",
                    "# TYPE fusesteer_engine_seconds_total counter"]
            for what, v in sorted(self.seconds.items()):
                out.append(f'fusesteer_engine_seconds_total{{part="{_esc(what)}"}} {v:.6f}')
            for name, h, help_ in (
                    ("fusesteer_batch_size", self.batch, "Rows in each decode forward."),
                    ("fusesteer_time_to_first_token_seconds", self.ttft, "Arrival to first generated token."),
                    ("fusesteer_inter_token_latency_seconds", self.itl, "Time between consecutive tokens.")):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
                cum = 0
                for b, c in zip(h.buckets, h.counts):
                    cum += c
                    out.append(f'{name}_bucket{{le="{b:g}"}} {cum}')
                out.append(f'{name}_bucket{{le="+Inf"}} {h.n}')
                out.append(f"{name}_sum {h.sum:.6f}")
                out.append(f"{name}_count {h.n}")
        return "\n".join(out) + "\n"
