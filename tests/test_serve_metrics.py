"""`/metrics` through prometheus_client (``serve/metrics.py``): for the same events, the exposition holds the
samples, help texts and types the hand-written exposition gave (``OLD``, recorded from it before the switch);
each server keeps its own registry."""

# ruff: noqa: E501 (OLD holds a recorded exposition, help lines as long as they were)

from __future__ import annotations

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from fusesteer.serve.metrics import Metrics  # noqa: E402

ODD = 'calm*0.8+"odd\\name\n"'

# fusesteer/serve/metrics.py before prometheus_client, after the events of _events()
OLD = r"""# HELP fusesteer_requests_total Finished requests by endpoint, steering plan and outcome.
# TYPE fusesteer_requests_total counter
fusesteer_requests_total{endpoint="chat",plan="calm*0.8+\"odd\\name\n\"",status="invalid_steering"} 1
fusesteer_requests_total{endpoint="completions",plan="-",status="http_400"} 1
fusesteer_requests_total{endpoint="completions",plan="none",status="ok"} 2
# HELP fusesteer_tokens_total Prompt and generated tokens by steering plan.
# TYPE fusesteer_tokens_total counter
fusesteer_tokens_total{plan="calm",kind="generated"} 2
fusesteer_tokens_total{plan="none",kind="generated"} 3
fusesteer_tokens_total{plan="none",kind="prompt"} 7
# HELP fusesteer_active_requests Requests holding a batch row.
# TYPE fusesteer_active_requests gauge
fusesteer_active_requests 2
# HELP fusesteer_plans_attached Effective plans held in the model's plan table.
# TYPE fusesteer_plans_attached gauge
fusesteer_plans_attached 1
# HELP fusesteer_plans_loaded Plans in the registry.
# TYPE fusesteer_plans_loaded gauge
fusesteer_plans_loaded 3
# HELP fusesteer_queued_requests Requests waiting for a batch row.
# TYPE fusesteer_queued_requests gauge
fusesteer_queued_requests 5
# HELP fusesteer_engine_seconds_total Engine thread time: whole steps, and model forwards within them (the rest is scheduling, KV bookkeeping and sampling).
# TYPE fusesteer_engine_seconds_total counter
fusesteer_engine_seconds_total{part="forward"} 1.250000
fusesteer_engine_seconds_total{part="step"} 1.625000
# HELP fusesteer_batch_size Rows decoding in each decode forward.
# TYPE fusesteer_batch_size histogram
fusesteer_batch_size_bucket{le="1"} 1
fusesteer_batch_size_bucket{le="2"} 1
fusesteer_batch_size_bucket{le="4"} 3
fusesteer_batch_size_bucket{le="8"} 3
fusesteer_batch_size_bucket{le="16"} 3
fusesteer_batch_size_bucket{le="32"} 3
fusesteer_batch_size_bucket{le="64"} 3
fusesteer_batch_size_bucket{le="128"} 3
fusesteer_batch_size_bucket{le="256"} 3
fusesteer_batch_size_bucket{le="+Inf"} 4
fusesteer_batch_size_sum 308.000000
fusesteer_batch_size_count 4
# HELP fusesteer_decode_bucket_rows Rows each decode forward runs at (its bucket: the decoding rows plus the idle or prefilling rows below the highest one).
# TYPE fusesteer_decode_bucket_rows histogram
fusesteer_decode_bucket_rows_bucket{le="1"} 1
fusesteer_decode_bucket_rows_bucket{le="2"} 1
fusesteer_decode_bucket_rows_bucket{le="4"} 3
fusesteer_decode_bucket_rows_bucket{le="8"} 3
fusesteer_decode_bucket_rows_bucket{le="16"} 3
fusesteer_decode_bucket_rows_bucket{le="32"} 3
fusesteer_decode_bucket_rows_bucket{le="64"} 3
fusesteer_decode_bucket_rows_bucket{le="128"} 3
fusesteer_decode_bucket_rows_bucket{le="256"} 3
fusesteer_decode_bucket_rows_bucket{le="+Inf"} 4
fusesteer_decode_bucket_rows_sum 308.000000
fusesteer_decode_bucket_rows_count 4
# HELP fusesteer_time_to_first_token_seconds Arrival to first generated token.
# TYPE fusesteer_time_to_first_token_seconds histogram
fusesteer_time_to_first_token_seconds_bucket{le="0.005"} 1
fusesteer_time_to_first_token_seconds_bucket{le="0.01"} 1
fusesteer_time_to_first_token_seconds_bucket{le="0.025"} 1
fusesteer_time_to_first_token_seconds_bucket{le="0.05"} 1
fusesteer_time_to_first_token_seconds_bucket{le="0.075"} 1
fusesteer_time_to_first_token_seconds_bucket{le="0.1"} 1
fusesteer_time_to_first_token_seconds_bucket{le="0.15"} 1
fusesteer_time_to_first_token_seconds_bucket{le="0.25"} 2
fusesteer_time_to_first_token_seconds_bucket{le="0.5"} 2
fusesteer_time_to_first_token_seconds_bucket{le="0.75"} 2
fusesteer_time_to_first_token_seconds_bucket{le="1"} 2
fusesteer_time_to_first_token_seconds_bucket{le="2.5"} 2
fusesteer_time_to_first_token_seconds_bucket{le="5"} 3
fusesteer_time_to_first_token_seconds_bucket{le="10"} 3
fusesteer_time_to_first_token_seconds_bucket{le="30"} 3
fusesteer_time_to_first_token_seconds_bucket{le="+Inf"} 3
fusesteer_time_to_first_token_seconds_sum 3.254000
fusesteer_time_to_first_token_seconds_count 3
# HELP fusesteer_inter_token_latency_seconds Time between consecutive tokens.
# TYPE fusesteer_inter_token_latency_seconds histogram
fusesteer_inter_token_latency_seconds_bucket{le="0.005"} 0
fusesteer_inter_token_latency_seconds_bucket{le="0.01"} 0
fusesteer_inter_token_latency_seconds_bucket{le="0.025"} 0
fusesteer_inter_token_latency_seconds_bucket{le="0.05"} 0
fusesteer_inter_token_latency_seconds_bucket{le="0.075"} 2
fusesteer_inter_token_latency_seconds_bucket{le="0.1"} 2
fusesteer_inter_token_latency_seconds_bucket{le="0.15"} 2
fusesteer_inter_token_latency_seconds_bucket{le="0.25"} 2
fusesteer_inter_token_latency_seconds_bucket{le="0.5"} 3
fusesteer_inter_token_latency_seconds_bucket{le="0.75"} 3
fusesteer_inter_token_latency_seconds_bucket{le="1"} 3
fusesteer_inter_token_latency_seconds_bucket{le="2.5"} 3
fusesteer_inter_token_latency_seconds_bucket{le="5"} 3
fusesteer_inter_token_latency_seconds_bucket{le="10"} 3
fusesteer_inter_token_latency_seconds_bucket{le="30"} 3
fusesteer_inter_token_latency_seconds_bucket{le="+Inf"} 4
fusesteer_inter_token_latency_seconds_sum 40.625000
fusesteer_inter_token_latency_seconds_count 4
"""


def _events(m: Metrics) -> None:
    m.count_request("completions", "none", "ok")
    m.count_request("completions", "none", "ok")
    m.count_request("chat", ODD, "invalid_steering")
    m.count_request("completions", "-", "http_400")
    m.count_tokens("none", "prompt", 7)
    m.count_tokens("none", "generated", 3)
    m.count_tokens("none", "generated", 0)
    m.count_tokens("calm", "generated", 2)
    for s in (0.004, 0.25, 3.0):
        m.observe_ttft(s)
    for s in (0.0625, 0.0625, 0.5, 40.0):
        m.observe_itl(s)
    for n in (1, 3, 4, 300):
        m.observe_batch(n, n)
    m.set_gauge("active_requests", 2)
    m.set_gauge("queued_requests", 5)
    m.set_gauge("plans_loaded", 3)
    m.set_gauge("plans_attached", 1)
    m.add_time("step", 1.5)
    m.add_time("forward", 1.25)
    m.add_time("step", 0.125)


# series added since the recording (the static-KV engine: compile, KV memory, prefix cache)
ADDED = {"fusesteer_compile_recompiles", "fusesteer_kv_cache_bytes", "fusesteer_prefix_cache_hit_rate",
         "fusesteer_prefix_cache_tokens"}


def _parsed(text: str):
    """{family: (type, help)}, {(sample, labels): value}, with bucket bounds compared as numbers."""
    fams, samples = {}, {}
    for f in text_string_to_metric_families(text):
        fams[f.name] = (f.type, f.documentation)
        for s in f.samples:
            labels = dict(s.labels)
            if "le" in labels:
                labels["le"] = float(labels["le"])
            samples[(s.name, tuple(sorted(labels.items())))] = s.value
    return ({k: v for k, v in fams.items() if k not in ADDED},
            {k: v for k, v in samples.items() if not any(k[0].startswith(a) for a in ADDED)})


def test_exposition_matches_the_hand_written_one():
    m = Metrics()
    _events(m)
    text = m.render()
    old_fams, old = _parsed(OLD)
    new_fams, new = _parsed(text)
    assert new_fams == old_fams
    assert new.keys() == old.keys()
    for k, v in old.items():
        assert new[k] == pytest.approx(v, abs=1e-6), k  # the old sums were printed with 6 decimals
    assert "_created" not in text
    # the line bench/serve.py reads
    assert 'fusesteer_engine_seconds_total{part="step"} 1.625\n' in text


def test_fresh_metrics_have_the_same_series_as_before():
    fams, samples = _parsed(Metrics().render())
    assert set(fams) == set(_parsed(OLD)[0])
    assert samples[("fusesteer_engine_seconds_total", (("part", "step"),))] == 0
    assert samples[("fusesteer_batch_size_count", ())] == 0
    assert not any(name == "fusesteer_requests_total" for name, _ in samples)


def test_each_server_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.count_request("chat", "none", "ok")
    a.observe_batch(5, 8)
    assert a.value("fusesteer_requests_total", endpoint="chat", plan="none", status="ok") == 1
    assert b.value("fusesteer_requests_total", endpoint="chat", plan="none", status="ok") == 0
    assert a.value("fusesteer_batch_size_count") == 1 and b.value("fusesteer_batch_size_count") == 0
    assert a.value("fusesteer_batch_size_bucket", le="4.0") == 0
    assert a.value("fusesteer_batch_size_bucket", le="8.0") == 1
