"""`fusesteer serve` end to end: the real `openai` client against the server on 127.0.0.1.

The main server runs SmolLM2-135M with four plans loaded from a folder (fusesteer .safetensors and a GGUF
control vector); every steered answer is compared token for token with the same request run alone with
``fs.attach`` + ``generate()`` on a second copy of the model. A second, tiny-model server with an API key,
one batch row and a one-slot queue covers 401, 429 + Retry-After and client disconnects.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_helpers import greedy_alone  # noqa: E402

import fusesteer as fs  # noqa: E402
from fusesteer.interop.gguf_cv import write_control_vector  # noqa: E402
from fusesteer.serve.server import Server  # noqa: E402

MODEL = "smollm2-135m"
N_TOK = 12
PROMPTS = ["The capital of France is", "Once upon a time, there was", "My favourite food is", "def add(a, b):",
           "The best way to learn a language is", "In the year 1492,", "Hello, my name is", "Tomorrow we will",
           "Water boils at", "The three primary colours are", "A good friend is someone who", "The sun rises in the"]


def _plans(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    spec_w = model.config.hidden_size
    plans = {}
    for i in range(3):
        p = fs.SteeringPlan.for_model(model, name=f"vec{i}")
        for layer in range(6 + i, 20, 4):
            p.add(layer=layer, site="layer.out", b=torch.randn(spec_w, generator=g))
        plans[f"vec{i}"] = p
    gains = fs.SteeringPlan.for_model(model, name="gains")
    idx = torch.randperm(spec_w, generator=g)[:40]
    gains.add(layer=9, site="attn.o_proj.in", dims=idx, a=1 + 0.5 * torch.randn(40, generator=g).abs())
    gains.add(layer=12, site="mlp.out", b=0.5 * torch.randn(spec_w, generator=g), gating="generated")
    plans["gains"] = gains
    return plans


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    model, tok = fs.models.load(MODEL, progress=False)
    ref, _ = fs.models.load(MODEL, progress=False)
    d = tmp_path_factory.mktemp("plans")
    plans = _plans(model)
    plans["vec0"].save(d / "vec0.safetensors")
    plans["vec1"].save(d / "vec1.safetensors")
    write_control_vector(plans["vec2"], d / "cv2.gguf")  # GGUF control vector: name = file stem
    plans["cv2"] = plans.pop("vec2")
    plans["gains"].save(d / "gains.safetensors")
    other = fs.SteeringPlan.for_model(fs.testing.tiny("llama"))
    other.add(layer=0, site="layer.out", b=torch.ones(64))
    other.save(d / "othermodel.safetensors")  # for another model: listed as unusable, requests get a 400
    srv = Server(model, tok, MODEL, plans_dir=d, port=0, backend="torch", max_batch=12, plan_slots=12,
                 max_tokens=64, max_model_len=160).start()
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
    yield {"srv": srv, "client": client, "tok": tok, "ref": ref, "plans": plans, "model": model}
    srv.stop()


def alone(env, ids, plan, n=N_TOK):
    """The request run by itself: fs.attach + greedy generate() on the second copy of the model."""
    return greedy_alone(env["ref"], ids, plan, n, pad_id=env["tok"].pad_token_id)


def composed(env, steering):
    if steering is None:
        return None
    items = steering if isinstance(steering, list) else [steering]
    out = None
    for it in items:
        p = env["plans"][it["plan"]].scaled(it.get("scale", 1.0))
        out = p if out is None else out.extend(p)
    return out


def _complete(client, prompt, steering=None, n=N_TOK, **kw):
    extra = {"return_token_ids": True}
    if steering is not None:
        extra["steering"] = steering
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, extra_body=extra, **kw)


def _token_ids(resp):
    return resp.choices[0].model_extra["token_ids"]


def _forwards_over(srv, rows: int) -> float:
    """Decode forwards so far with more than ``rows`` rows (``rows``: a bucket bound of fusesteer_batch_size)."""
    m = srv.metrics
    return m.value("fusesteer_batch_size_count") - m.value("fusesteer_batch_size_bucket", le=f"{float(rows)}")


# ------------------------------------------------------------------------------------------------


def test_completions_chat_and_streaming(env):
    c, tok = env["client"], env["tok"]
    assert [m.id for m in c.models.list().data] == [MODEL]
    r = _complete(c, "The capital of France is", n=8)
    ids = tok("The capital of France is")["input_ids"]
    assert _token_ids(r) == alone(env, ids, None, 8)
    assert r.choices[0].text == tok.decode(_token_ids(r), skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(_token_ids(r))
    assert r.choices[0].finish_reason in ("length", "stop")

    msgs = [{"role": "user", "content": "Name a colour."}]
    chat = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0,
                                     extra_body={"steering": {"plan": "vec0", "scale": 0.5}, "return_token_ids": True})
    cids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    want = alone(env, list(cids), env["plans"]["vec0"].scaled(0.5), 10)
    assert chat.choices[0].model_extra["token_ids"] == want
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == tok.decode(want, skip_special_tokens=True)

    # streaming, both endpoints: the chunks add up to the non-streamed answer
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"steering": {"plan": "vec0", "scale": 0.5}}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == chat.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    s = list(c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0,
                                  stream=True))
    assert "".join(ch.choices[0].text for ch in s) == r.choices[0].text
    # stop strings end the text before the stop
    r2 = c.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 7"])
    assert " 7" not in r2.choices[0].text and r2.choices[0].finish_reason == "stop"


def test_twelve_concurrent_requests_equal_alone(env):
    """4 plans (+ a composition) and unsteered rows in one continuous batch; each equals running it alone."""
    c, tok, srv = env["client"], env["tok"], env["srv"]
    specs = [{"plan": "vec0"}, {"plan": "vec1", "scale": 0.7}, None, {"plan": "cv2", "scale": 0.8},
             {"plan": "gains"}, None, {"plan": "vec0", "scale": 0.6}, [{"plan": "vec1", "scale": 0.5},
             {"plan": "gains", "scale": 0.5}], None, {"plan": "cv2"}, {"plan": "gains", "scale": 1.5},
             {"plan": "vec1"}]
    steps0 = srv.metrics.value("fusesteer_batch_size_count")  # decode forwards so far
    big0 = _forwards_over(srv, 4)
    results: dict[int, object] = {}

    def go(i):
        time.sleep(0.02 * i)  # staggered: later requests join a batch that is already decoding
        results[i] = _complete(c, PROMPTS[i], specs[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 12
    assert _forwards_over(srv, 4) > big0, "requests were not batched together"
    assert srv.metrics.value("fusesteer_batch_size_count") - steps0 < 12 * N_TOK
    outs = {}
    for i in range(12):
        ids = tok(PROMPTS[i])["input_ids"]
        want = alone(env, ids, composed(env, specs[i]))
        assert _token_ids(results[i]) == want, (i, specs[i], tok.decode(_token_ids(results[i])), tok.decode(want))
        outs[i] = want
    # and the plans do steer: steered answers differ from the unsteered ones
    differ = sum(outs[i] != alone(env, tok(PROMPTS[i])["input_ids"], None) for i in range(12) if specs[i])
    assert differ >= 6


def test_upload_use_delete_while_another_request_decodes(env):
    c, tok, srv = env["client"], env["tok"], env["srv"]
    model = env["model"]
    g = torch.Generator().manual_seed(7)
    fresh = fs.SteeringPlan.for_model(model, name="fresh")
    for layer in (7, 11, 15):
        fresh.add(layer=layer, site="layer.out", b=torch.randn(model.config.hidden_size, generator=g))
    blob = _plan_bytes(fresh)
    handle = srv.steerer.handle
    # a streaming request is decoding while the plan is uploaded and used
    prompt = "Once upon a time, there was"
    stream = c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                  extra_body={"steering": {"plan": "vec1"}})
    it = iter(stream)
    first = next(it).choices[0].text
    up = httpx.post(srv.url + "/v1/steering/plans", params={"name": "fresh"}, content=blob, timeout=30)
    assert up.status_code == 201, up.text
    assert up.json()["name"] == "fresh" and up.json()["layers"] == [7, 11, 15]
    names = {p["name"]: p for p in httpx.get(srv.url + "/v1/steering/plans").json()["data"]}
    assert names["fresh"]["fingerprint"] == fresh.spec.fingerprint() and names["fresh"]["sites"] == ["layer.out"]
    r = _complete(c, "My favourite food is", {"plan": "fresh", "scale": 0.9})
    assert _token_ids(r) == alone(env, tok("My favourite food is")["input_ids"], fresh.scaled(0.9))
    text = first + "".join(ch.choices[0].text for ch in it)
    want = alone(env, tok(prompt)["input_ids"], env["plans"]["vec1"], 24)
    assert text == tok.decode(want, skip_special_tokens=True), "the request in flight was disturbed"
    assert srv.steerer.handle is handle, "hot-loading re-attached (re-patched) the model"
    # same name again: 409; delete; then it is gone
    assert httpx.post(srv.url + "/v1/steering/plans", params={"name": "fresh"}, content=blob).status_code == 409
    d = httpx.delete(srv.url + "/v1/steering/plans/fresh")
    assert d.status_code == 200 and d.json()["deleted"] is True
    with pytest.raises(openai.BadRequestError, match="fresh"):
        _complete(c, "Hi", {"plan": "fresh"})
    assert httpx.delete(srv.url + "/v1/steering/plans/fresh").status_code == 404


def _plan_bytes(plan) -> bytes:
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "p.safetensors")
        plan.save(path)
        with open(path, "rb") as f:
            return f.read()


def _post(env, body, raw=None, headers=None, path="/v1/completions"):
    return httpx.post(env["srv"].url + path, content=raw if raw is not None else json.dumps(body),
                      headers={"Content-Type": "application/json", **(headers or {})}, timeout=60)


def test_bad_requests_get_specific_400s(env):
    c = env["client"]
    with pytest.raises(openai.BadRequestError, match="unknown steering plan 'nosuch'"):
        _complete(c, "Hi", {"plan": "nosuch"})
    with pytest.raises(openai.BadRequestError, match="another model"):
        _complete(c, "Hi", {"plan": "othermodel"})
    with pytest.raises(openai.BadRequestError, match="at most 8"):
        _complete(c, "Hi", [{"plan": "vec0"}] * 9)
    with pytest.raises(openai.BadRequestError, match="scale must be a number"):
        _complete(c, "Hi", {"plan": "vec0", "scale": "big"})
    with pytest.raises(openai.BadRequestError, match="unknown fields"):
        _complete(c, "Hi", {"plan": "vec0", "strength": 2})
    # NaN is not JSON, but Python-style encoders send it: it still gets a 400 naming the scale
    r = _post(env, None, raw='{"model": "%s", "prompt": "Hi", "steering": {"plan": "vec0", "scale": NaN}}' % MODEL)
    assert r.status_code == 400 and "finite" in r.json()["error"]["message"], r.text
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        c.completions.create(model=MODEL, prompt="word " * 200, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="over this server's limit of 64"):
        c.completions.create(model=MODEL, prompt="Hi", max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="'n' must be 1"):
        c.completions.create(model=MODEL, prompt="Hi", max_tokens=4, n=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.completions.create(model="gpt-4", prompt="Hi", max_tokens=4)
    assert _post(env, None, raw="{not json").status_code == 400
    bad_msgs = _post(env, {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
                     path="/v1/chat/completions")
    assert bad_msgs.status_code == 400 and "role" in bad_msgs.json()["error"]["message"]
    # uploads: not a plan, a plan for another model, a bad name
    up = httpx.post(env["srv"].url + "/v1/steering/plans", params={"name": "junk"}, content=b"\x00" * 100)
    assert up.status_code == 400 and "junk" in up.json()["error"]["message"]
    other = fs.SteeringPlan.for_model(fs.testing.tiny("llama"))
    other.add(layer=1, site="layer.out", b=torch.ones(64))
    up = httpx.post(env["srv"].url + "/v1/steering/plans", params={"name": "other2"}, content=_plan_bytes(other))
    assert up.status_code == 400 and "another model" in up.json()["error"]["message"]
    up = httpx.post(env["srv"].url + "/v1/steering/plans", params={"name": "../etc"}, content=b"x")
    assert up.status_code == 400
    # the server still serves
    assert _complete(c, "Hi", n=2).choices[0].finish_reason in ("length", "stop")


def test_non_finite_plan_fails_only_its_request(env):
    c, tok, srv, model = env["client"], env["tok"], env["srv"], env["model"]
    boom = fs.SteeringPlan.for_model(model, name="boom")
    for layer in range(4, 12):
        boom.add(layer=layer, site="layer.out", b=torch.full((model.config.hidden_size,), 3e38), gating="generated")
    assert httpx.post(srv.url + "/v1/steering/plans", params={"name": "boom"},
                      content=_plan_bytes(boom)).status_code == 201
    out = {}

    def good():
        out["good"] = _complete(c, PROMPTS[2], {"plan": "vec0"}, n=16)

    t = threading.Thread(target=good)
    t.start()
    time.sleep(0.05)
    with pytest.raises(openai.BadRequestError, match="non-finite"):
        _complete(c, PROMPTS[3], {"plan": "boom"}, n=16)
    t.join(60)
    assert _token_ids(out["good"]) == alone(env, tok(PROMPTS[2])["input_ids"], env["plans"]["vec0"], 16)
    httpx.delete(srv.url + "/v1/steering/plans/boom")


def test_metrics_and_health(env):
    url = env["srv"].url
    h = httpx.get(url + "/health").json()
    assert h["status"] == "ok" and h["model"] == MODEL
    m = httpx.get(url + "/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    for name in ("fusesteer_requests_total", "fusesteer_tokens_total", "fusesteer_active_requests",
                 "fusesteer_queued_requests", "fusesteer_batch_size_bucket", "fusesteer_time_to_first_token_seconds",
                 "fusesteer_inter_token_latency_seconds_count"):
        assert name in text
    assert 'plan="vec0"' in text and 'kind="generated"' in text


# ------------------------------------------------------------------------------------------------
# a tiny server: API key, one row, one queue slot


@pytest.fixture(scope="module")
def tiny(env):
    tok = env["tok"]
    model = fs.testing.tiny("llama", vocab_size=len(tok), max_position_embeddings=4096)
    srv = Server(model, tok, "tiny", port=0, backend="torch", api_key="sekrit", max_batch=1, max_queue=1,
                 max_tokens=3000, max_plan_bytes=1 << 16).start()
    yield srv
    srv.stop()


def test_api_key(tiny):
    for key in (None, "wrong"):
        hdr = {} if key is None else {"Authorization": f"Bearer {key}"}
        r = httpx.post(tiny.url + "/v1/completions", json={"model": "tiny", "prompt": "Hi"}, headers=hdr)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=tiny.url + "/v1", api_key="wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=tiny.url + "/v1", api_key="sekrit", max_retries=0)
    assert ok.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0).usage.completion_tokens == 3
    assert httpx.get(tiny.url + "/health").status_code == 200  # health and metrics stay open


def test_full_queue_429_and_disconnect_frees_the_row(tiny):
    c = openai.OpenAI(base_url=tiny.url + "/v1", api_key="sekrit", max_retries=0, timeout=60)
    eng = tiny.engine
    # A holds the only row (a long generation), B waits in the only queue slot, C is refused
    a = c.completions.create(model="tiny", prompt="Hi", max_tokens=3000, temperature=0, stream=True)
    it = iter(a)
    next(it)
    t0 = time.monotonic()
    while eng.active == 0 and time.monotonic() - t0 < 10:  # its first token can arrive before it joins the batch
        time.sleep(0.01)
    assert eng.active == 1
    res = {}
    tb = threading.Thread(target=lambda: res.setdefault("b", c.completions.create(
        model="tiny", prompt="Hello", max_tokens=5, temperature=0)))
    tb.start()
    t0 = time.monotonic()
    while eng.queued == 0 and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    with pytest.raises(openai.RateLimitError) as ei:
        c.completions.create(model="tiny", prompt="Hey", max_tokens=5)
    assert int(ei.value.response.headers["retry-after"]) >= 1
    assert ei.value.response.json()["error"]["code"] == "queue_full"
    # A's client goes away: its request is cancelled and B gets the row long before A would have finished
    a.response.close()
    tb.join(30)
    assert res["b"].usage.completion_tokens == 5
    t0 = time.monotonic()
    while eng.active and time.monotonic() - t0 < 5:
        time.sleep(0.01)
    assert eng.active == 0 and eng.queued == 0
    assert tiny.metrics.value("fusesteer_requests_total", endpoint="completions", plan="none", status="cancelled") >= 1


def test_cli_verb_has_help():
    from fusesteer.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0


def test_sampling_is_seeded(env):
    c = env["client"]
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0.9, top_p=0.9)
    a = c.completions.create(seed=1234, **kw).choices[0].text
    b = c.completions.create(seed=1234, **kw).choices[0].text
    assert a == b and len(a) > 0


def test_a_broken_step_fails_its_requests_and_the_server_goes_on(tiny):
    eng = tiny.engine
    hdr = {"Authorization": "Bearer sekrit"}
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 3, "temperature": 0}

    def broken(*a, **k):
        raise RuntimeError("injected failure")

    eng._forward = broken
    try:
        r = httpx.post(tiny.url + "/v1/completions", json=body, headers=hdr, timeout=30)
        assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"]
    finally:
        del eng._forward
    r = httpx.post(tiny.url + "/v1/completions", json=body, headers=hdr, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_non_streaming_client_that_goes_away_frees_its_row(tiny):
    eng = tiny.engine
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 3000, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tiny.url + "/v1/completions", json=body, headers={"Authorization": "Bearer sekrit"}, timeout=0.5)
    t0 = time.monotonic()
    while eng.active and time.monotonic() - t0 < 5:
        time.sleep(0.02)
    assert eng.active == 0, "the abandoned request kept its row"


def test_upload_size_cap_and_gguf_upload(tiny, env):
    hdr = {"Authorization": "Bearer sekrit"}
    up = httpx.post(tiny.url + "/v1/steering/plans", params={"name": "huge"}, content=b"\x00" * (1 << 17), headers=hdr)
    assert up.status_code == 413 and up.json()["error"]["code"] == "plan_too_large"
    # a GGUF control vector upload on the main server, used, listed as gguf, deleted
    import os
    import tempfile

    srv = env["srv"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "v.gguf")
        write_control_vector(env["plans"]["vec0"], path)
        blob = open(path, "rb").read()
    up = httpx.post(srv.url + "/v1/steering/plans", params={"name": "cvup"}, content=blob)
    assert up.status_code == 201 and up.json()["format"] == "gguf", up.text
    r = _complete(env["client"], PROMPTS[6], {"plan": "cvup", "scale": 0.5}, n=8)
    assert _token_ids(r) == alone(env, env["tok"](PROMPTS[6])["input_ids"], env["plans"]["vec0"].scaled(0.5), 8)
    assert httpx.delete(srv.url + "/v1/steering/plans/cvup").status_code == 200
