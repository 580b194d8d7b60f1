"""The static-KV engine (``serve/kv.py``, ``forward.py``, ``prefix.py``, ``engine.py``) on a tiny random Llama
served over HTTP, decode compiled with ``torch.compile(fullgraph=True, backend="eager")`` (dynamo's tracing and
guards without inductor's code generation): chunked prefill keeps running streams streaming, the prefix cache
never shares KV between different prompt steering, and a load test with plan uploads, deletions, new scales
and phase changes causes no recompile after the warm-up. Every answer equals the request run alone
(``fs.attach`` + ``generate()``)."""

from __future__ import annotations

import os
import tempfile
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from serve_helpers import greedy_alone  # noqa: E402

import fusesteer as fs  # noqa: E402
from fusesteer.serve.server import Server  # noqa: E402

CHUNK = 8


@pytest.fixture(scope="module")
def env():
    tok = fs.models.load("smollm2-135m", progress=False)[1]
    model = fs.testing.tiny("llama", vocab_size=len(tok), max_position_embeddings=4096)
    ref = fs.testing.tiny("llama", vocab_size=len(tok), max_position_embeddings=4096)
    srv = Server(model, tok, "tiny", port=0, backend="torch", max_batch=4, max_queue=64, max_tokens=64,
                 max_model_len=320, max_prefill_tokens=CHUNK, compile=True, compile_backend="eager").start()
    yield {"srv": srv, "model": model, "ref": ref, "tok": tok}
    srv.stop()


def _plan(model, seed, gating="all"):
    g = torch.Generator().manual_seed(seed)
    p = fs.SteeringPlan.for_model(model, name=f"p{seed}")
    for layer in range(model.config.num_hidden_layers):
        p.add(layer=layer, site="layer.out", b=2 * torch.randn(model.config.hidden_size, generator=g), gating=gating)
    return p


def _upload(srv, name, plan):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "p.safetensors")
        plan.save(path)
        with open(path, "rb") as f:
            blob = f.read()
    r = httpx.post(srv.url + "/v1/steering/plans", params={"name": name}, content=blob, timeout=30)
    assert r.status_code in (200, 201), r.text


def _complete(srv, ids, n, steering=None):
    body = {"model": "tiny", "prompt": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    if steering is not None:
        body["steering"] = steering
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def alone(env, ids, plan, n):
    return greedy_alone(env["ref"], ids, plan, n, exact=True)


def _ids(seed, n):
    return torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_running_streams_keep_streaming_while_a_long_prompt_prefills(env):
    srv = env["srv"]
    short, long_ = _ids(1, 5), _ids(2, 25 * CHUNK)
    times: dict = {"stream": []}
    out = {}

    def stream():
        body = {"model": "tiny", "prompt": short, "max_tokens": 60, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    times["stream"].append(time.perf_counter())

    t = threading.Thread(target=stream)
    t.start()
    while len(times["stream"]) < 3:
        time.sleep(0.005)
    t0 = time.perf_counter()
    out["long"] = _complete(srv, long_, 4)
    t1 = time.perf_counter()
    t.join(60)
    during = [x for x in times["stream"] if t0 < x < t1]
    # the 25-chunk prompt took >= 25 engine steps; the stream got a token at (nearly) every one of them
    assert len(during) >= 15, len(during)
    assert out["long"] == alone(env, long_, None, 4)
    assert _complete(srv, short, 8) == alone(env, short, None, 8)


def test_prefix_cache_never_shares_kv_between_different_prompt_steering(env):
    srv, model = env["srv"], env["model"]
    _upload(srv, "pa", _plan(model, 11))
    _upload(srv, "pb", _plan(model, 12))
    _upload(srv, "gen", _plan(model, 13, gating="generated"))
    m = srv.metrics
    prefix = _ids(5, 40)
    a, b = prefix + _ids(6, 3), prefix + _ids(7, 4)
    hits0 = m.value("fusesteer_prefix_cache_tokens_total", result="hit")
    steps0, rows0 = m.value("fusesteer_decode_bucket_rows_count"), m.value("fusesteer_decode_bucket_rows_sum")
    got_a = _complete(srv, a, 6, {"plan": "pa"})
    got_b = _complete(srv, b, 6, {"plan": "pb"})
    assert m.value("fusesteer_prefix_cache_tokens_total", result="hit") == hits0, "KV shared across plans"
    assert got_a == alone(env, a, _plan(model, 11), 6)
    assert got_b == alone(env, b, _plan(model, 12), 6)
    # the same plan again shares the prefix, and still equals its solo run
    got_a2 = _complete(srv, prefix + [9, 9], 6, {"plan": "pa"})
    assert m.value("fusesteer_prefix_cache_tokens_total", result="hit") >= hits0 + 40
    assert got_a2 == alone(env, prefix + [9, 9], _plan(model, 11), 6)
    # a generated-only plan shares the unsteered prompt's KV
    _complete(srv, prefix + [4], 2)
    h = m.value("fusesteer_prefix_cache_tokens_total", result="hit")
    got_g = _complete(srv, prefix + [5, 6], 6, {"plan": "gen", "scale": 0.5})
    assert m.value("fusesteer_prefix_cache_tokens_total", result="hit") >= h + 40
    assert got_g == alone(env, prefix + [5, 6], _plan(model, 13, gating="generated").scaled(0.5), 6)
    assert 0 < m.value("fusesteer_prefix_cache_hit_rate") < 1
    # one request at a time decodes at bucket 1: a new row takes slot 0 (the cached prefixes move up), never a
    # higher free slot that would make every step run at a larger bucket
    steps = m.value("fusesteer_decode_bucket_rows_count") - steps0
    assert steps >= 20 and m.value("fusesteer_decode_bucket_rows_sum") - rows0 == steps
    for name in ("pa", "pb", "gen"):
        httpx.delete(srv.url + f"/v1/steering/plans/{name}")


def test_requests_arriving_together_compute_a_shared_prompt_prefix_once(env):
    """Rows admitted in the same step: one with a prompt prefix another is prefilling (same prompt steering) waits
    and copies that KV instead of computing it beside it; a row with other prompt steering never does. Each equals
    its solo run."""
    from fusesteer.serve.registry import Steering
    from fusesteer.serve.requests import GenRequest

    srv, model = env["srv"], env["model"]
    eng, m = srv.engine, srv.metrics
    _upload(srv, "pc", _plan(model, 14))
    pc = Steering(((srv.registry.get("pc"), 1.0),))
    prefix = _ids(80, 40)
    p1, p2 = prefix + _ids(81, 2), prefix + _ids(82, 3)
    assert p1[40] != p2[40]
    jobs = [(p1, None), (p2, None), (p1, "pc"), (p1, "pc")]  # the server's 4 slots
    done = [threading.Event() for _ in jobs]
    got: list[list] = [[] for _ in jobs]

    def sink(i):
        def put(ev):
            if ev[0] == "token":
                got[i].append(ev[1])
            else:
                assert ev[0] == "finish", ev
                done[i].set()
        return put

    hits0 = m.value("fusesteer_prefix_cache_tokens_total", result="hit")
    reqs = [GenRequest(list(ids), 6, sink(i), steering=pc if plan else Steering())
            for i, (ids, plan) in enumerate(jobs)]
    with eng._cv:  # all four are waiting when the engine next looks: admitted in one step
        for r in reqs:
            eng.submit(r)
    assert all(e.wait(120) for e in done)
    # p2 copies the 40 shared tokens from p1's row, the second "pc" row p1's 41 from the first "pc" row; the
    # "pc" rows share nothing with the unsteered ones (that would add 40 more)
    assert m.value("fusesteer_prefix_cache_tokens_total", result="hit") - hits0 == 40 + 41
    for (ids, plan), toks in zip(jobs, got):
        assert toks == alone(env, ids, _plan(model, 14) if plan else None, 6)
    httpx.delete(srv.url + "/v1/steering/plans/pc")


def test_a_last_prompt_token_rides_in_the_decode_step(env):
    """A row with one prompt token left (a full prefix hit, a one-token prompt) computes it as one more row of the
    decode forward: no prefill forward for it, and the tokens equal its solo run (prompt-phase steering included)."""
    srv, model = env["srv"], env["model"]
    eng, m = srv.engine, srv.metrics
    _upload(srv, "pd", _plan(model, 15))
    calls = []
    real = eng.fw.prefill

    def counting(chunks):
        calls.append(len(chunks))
        return real(chunks)

    eng.fw.prefill = counting
    try:
        ids = _ids(90, 12)
        first = _complete(srv, ids, 5, {"plan": "pd"})
        n = len(calls)
        assert n >= 1
        h = m.value("fusesteer_prefix_cache_tokens_total", result="hit")
        again = _complete(srv, ids, 5, {"plan": "pd"})  # 11 of 12 prompt tokens cached: no prefill forward
        assert m.value("fusesteer_prefix_cache_tokens_total", result="hit") == h + 11 and len(calls) == n
        one = _complete(srv, [ids[0]], 5)  # a one-token prompt: decode only
        assert len(calls) == n
    finally:
        del eng.fw.prefill
    want = alone(env, ids, _plan(model, 15), 5)
    assert first == again == want
    assert one == alone(env, [ids[0]], None, 5)
    httpx.delete(srv.url + "/v1/steering/plans/pd")


def test_no_recompiles_after_warmup_under_load_with_plan_changes(env):
    """Concurrent requests of many lengths (every bucket, rows joining and leaving), plans uploaded, used at new
    scales and in compositions, deleted while others decode; prompt -> generated phase changes on every row."""
    srv, model = env["srv"], env["model"]
    eng = srv.engine
    assert eng.fw.copts.enabled and eng.fw.buckets == (1, 2, 4)
    r0 = eng.recompiles
    kv0 = eng.fw.cache.nbytes()
    results, errors = {}, []

    def go(i):
        try:
            time.sleep(0.01 * (i % 5))
            steer = [None, {"plan": "q0"}, {"plan": "q1", "scale": 0.3 + 0.1 * i},
                     [{"plan": "q0", "scale": 0.5}, {"plan": "q1", "scale": -0.5}]][i % 4]
            ids = _ids(100 + i, 3 + (7 * i) % 30)
            results[i] = (ids, steer, _complete(srv, ids, 3 + i % 9, steer))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    for rnd in range(2):
        _upload(srv, "q0", _plan(model, 20 + rnd))
        _upload(srv, "q1", _plan(model, 30 + rnd, gating="generated"))
        threads = [threading.Thread(target=go, args=(10 * rnd + i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for name in ("q0", "q1"):
            assert httpx.delete(srv.url + f"/v1/steering/plans/{name}").status_code == 200
    assert not errors, errors
    assert eng.recompiles == r0 == 0
    assert "fusesteer_compile_recompiles 0.0" in httpx.get(srv.url + "/metrics").text
    assert eng.fw.cache.nbytes() == kv0  # the KV memory is what was allocated at start
    # spot-check equality (one per steering kind) against solo runs with the plans of their round
    for i in (0, 1, 12, 13):
        ids, steer, got = results[i]
        rnd = i // 10
        plans = {"q0": _plan(model, 20 + rnd), "q1": _plan(model, 30 + rnd, gating="generated")}
        items = [] if steer is None else (steer if isinstance(steer, list) else [steer])
        plan = None
        for it in items:
            p = plans[it["plan"]].scaled(it.get("scale", 1.0))
            plan = p if plan is None else plan.extend(p)
        assert got == alone(env, ids, plan, len(got)), i
