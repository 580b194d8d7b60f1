"""Server fuzzer: malformed and extreme request bodies (every field's type and range, NaN / Infinity, integers of
hundreds of digits, deep nesting, wrong encodings) fired concurrently with well-formed streaming requests made
with the real `openai` client. Every fuzz request must get a 2xx or a specific 4xx (never a 5xx); every
well-formed stream must finish and equal its solo run. Seeded and bounded (count and time) for CI.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import fusesteer as fs  # noqa: E402
from fusesteer.serve.server import Server  # noqa: E402

NAME = "tiny"
N_FUZZ = 1000  # fuzz requests
TIME_BUDGET_S = 40.0  # the fuzz phase stops here even if N_FUZZ are not sent
WORKERS = 4
MAX_REPEATS = 40  # runs of each well-formed stream at most
SEED = 22

BIG = "1" + "0" * 400
# raw JSON texts (so that NaN, Infinity and huge integers reach the server as clients send them)
NUMBERS = ["0", "1", "-1", "0.5", "2", "2.0000001", "-0.0", "1e-40", "5e-324", "1e-300", "1e308", "1e400", "-1e400",
           "NaN", "Infinity", "-Infinity", BIG, "-" + BIG, "1.5", "100", "101", "-100", "3e38", "65", "4097"]
OTHERS = ["null", "true", "false", '""', '"1"', '"abc"', "[]", "[1]", "{}", '{"a": 1}', '"' + "x" * 5000 + '"',
          "[" * 60 + "]" * 60, '"\\ud800"']
FIELDS = ["temperature", "top_p", "top_k", "seed", "max_tokens", "min_tokens", "n", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "stream", "ignore_eos", "return_token_ids", "echo", "logprobs",
          "best_of", "suffix", "user", "stop", "stream_options", "logit_bias", "steering", "response_format",
          "tool_choice", "tools", "max_completion_tokens", "unknown_field", "model"]
SPECIAL = {
    "stop": ['"\\n"', '["a", "b"]', '["a", "b", "c", "d", "e"]', '[""]', '[1]', '"' + "s" * 300 + '"'],
    "stream_options": ['{"include_usage": true}', '{"include_usage": "yes"}', '{"other": 1}'],
    "logit_bias": ['{"42": 100}', '{"42": -100}', '{"42": 101}', '{"x": 1}', '{"-1": 1}', '{"99999999": 5}',
                   '{"42": NaN}', '{"42": ' + BIG + '}', "{" + ", ".join(f'"{i}": 1' for i in range(1100)) + "}"],
    "steering": ['{"plan": "fz"}', '{"plan": "fz", "scale": ' + BIG + '}', '{"plan": "fz", "scale": NaN}',
                 '{"plan": "fz", "scale": 1e400}', '{"plan": "nosuch"}', '{"plan": "fz", "x": 1}',
                 '[{"plan": "fz"}, {"plan": "fz", "scale": -0.5}]', "[" + ", ".join(['{"plan": "fz"}'] * 9) + "]",
                 '{"plan": ' + "[" * 200 + "]" * 200 + "}", '{"plan": "fz", "scale": 1e4}', '"fz"'],
    "response_format": ['{"type": "text"}', '{"type": "json_object"}'],
    "tool_choice": ['"none"', '"auto"'],
    "model": ['"tiny"', '"gpt-4"', "5"],
}
PROMPTS = ['"Hi"', '"Once upon a time"', '""', "[1, 2, 3]", "[" + BIG + "]", "[-1]", '["a", "b"]', "[[1, 2]]",
           "[true]", "5", '"' + "word " * 4000 + '"', '"' + "w" * 30000 + '"', "null"]
MESSAGES = ['[{"role": "user", "content": "Hi"}]', "[]", '[{"role": "wizard", "content": "x"}]',
            '[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]', '[{"role": "user"}]',
            '[{"role": "user", "content": [{"type": "image_url"}]}]', '"Hi"']
RAW_BODIES = [b"", b"{", b"[]", b"null", b'"x"', b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000,
              b'{"model": "tiny", "prompt": "Hi", "prompt": "dup"}', b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}"]
OK = {200, 400, 404, 413, 429}


# values inside each field's range, extremes included (half the fuzzed fields get one)
VALID = {"temperature": ["0", "1e-40", "5e-324", "2", "0.7", "1e-300"], "top_p": ["5e-324", "1", "0.3", "1e-300"],
         "top_k": ["-1", "0", "1", "5", "99999999", BIG], "seed": ["0", BIG, "-5", "-" + BIG],
         "max_tokens": ["1", "8"], "min_tokens": ["0", "2", "8"], "presence_penalty": ["-2", "2", "0.5"],
         "frequency_penalty": ["-2", "2", "-0.0"], "repetition_penalty": ["0.01", "10", "0.5", "1"],
         "stream": ["true", "false"], "ignore_eos": ["true", "false"], "return_token_ids": ["true", "false"],
         "n": ["1", "1.0"], "user": ['"u"'], "echo": ["false"], "best_of": ["1"], "logprobs": ["null"]}


def _value(rng: random.Random, field: str) -> str:
    if field in VALID and rng.random() < 0.5:
        return rng.choice(VALID[field])
    return rng.choice(SPECIAL.get(field, []) + NUMBERS + OTHERS)


def _fuzz_body(rng: random.Random) -> tuple[str, bytes]:
    """(path, raw body): a mostly-valid request with 1-4 fields set to random raw JSON values."""
    if rng.random() < 0.05:
        return rng.choice(["/v1/completions", "/v1/chat/completions"]), rng.choice(RAW_BODIES)
    chat = rng.random() < 0.4
    parts = {"model": '"tiny"', "max_tokens": str(rng.randint(1, 8))}
    if chat:
        parts["messages"] = rng.choice(MESSAGES) if rng.random() < 0.3 else MESSAGES[0]
    else:
        parts["prompt"] = rng.choice(PROMPTS) if rng.random() < 0.3 else PROMPTS[0]
    for field in rng.sample(FIELDS, rng.randint(1, 4)):
        parts[field] = _value(rng, field)
    body = "{" + ", ".join(f'"{k}": {v}' for k, v in parts.items()) + "}"
    return ("/v1/chat/completions" if chat else "/v1/completions"), body.encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    tok = fs.models.load("smollm2-135m", progress=False)[1]
    model = fs.testing.tiny("llama", vocab_size=len(tok), max_position_embeddings=256)
    s = Server(model, tok, NAME, port=0, backend="torch", max_batch=8, max_queue=64, max_tokens=64,
               max_plan_entries=64).start()
    g = torch.Generator().manual_seed(0)
    plan = fs.SteeringPlan.for_model(model, name="fz")
    for layer in range(3):
        plan.add(layer=layer, site="layer.out", b=0.5 * torch.randn(64, generator=g))
    path = tmp_path_factory.mktemp("fz") / "fz.safetensors"
    plan.save(path)
    assert httpx.post(s.url + "/v1/steering/plans", params={"name": "fz"}, content=path.read_bytes()).status_code == 201
    yield s
    s.stop()


WELL_FORMED = [
    ("Once upon a time", {}), ("The weather today", {"steering": {"plan": "fz", "scale": 0.7}}),
    ("My favourite colour", {"logit_bias": {"42": 4}, "repetition_penalty": 1.5}), ("Dear diary", {"top_k": 1}),
    ("In the beginning", {"steering": {"plan": "fz"}, "presence_penalty": 1.0}), ("Hello there", {"min_tokens": 3}),
]


def _stream(client, prompt, extra, n=24):
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True, **extra}))
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].choices[0].finish_reason


def test_fuzz_bodies_beside_well_formed_streams(srv):
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
    solo = [_stream(client, p, kw) for p, kw in WELL_FORMED]
    assert all(reason == "length" for _, reason in solo)

    rng = random.Random(SEED)
    cases = [_fuzz_body(rng) for _ in range(N_FUZZ)]
    statuses: dict[int, int] = {}
    codes: dict = {}
    failures: list = []
    sent = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + TIME_BUDGET_S

    def fuzz(worker: int):
        with httpx.Client(base_url=srv.url, timeout=60, headers={"Content-Type": "application/json"}) as c:
            for i in range(worker, len(cases), WORKERS):
                if time.monotonic() > deadline:
                    return
                path, raw = cases[i]
                try:
                    r = c.post(path, content=raw)
                    text = r.text
                except httpx.HTTPError as e:
                    with lock:
                        failures.append((i, path, raw[:120], f"{type(e).__name__}: {e}"))
                    continue
                with lock:
                    sent[0] += 1
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code not in OK:
                        failures.append((i, path, raw[:160], r.status_code, text[:300]))
                    elif r.status_code != 200:
                        err = r.json().get("error", {})
                        codes[err.get("code")] = codes.get(err.get("code"), 0) + 1
                        if not err.get("message") or len(text) > 2000:
                            failures.append((i, path, raw[:160], r.status_code, text[:300]))

    fuzzing = threading.Event()
    fuzzing.set()

    def well_formed(k: int, out: dict):
        # each well-formed request runs again and again (staggered) for as long as the fuzzer fires
        time.sleep(0.05 * k)
        for rep in range(MAX_REPEATS):
            out[(k, rep)] = _stream(client, *WELL_FORMED[k])
            if not fuzzing.is_set():
                return

    t0 = time.monotonic()
    got: dict = {}
    fuzzers = [threading.Thread(target=fuzz, args=(w,)) for w in range(WORKERS)]
    streams = [threading.Thread(target=well_formed, args=(k, got)) for k in range(len(WELL_FORMED))]
    for t in fuzzers + streams:
        t.start()
    for t in fuzzers:
        t.join(120)
    fuzzing.clear()
    for t in streams:
        t.join(120)
    elapsed = time.monotonic() - t0
    print(f"\nserver fuzz: {sent[0]} fuzz requests ({statuses}) + {len(got)} well-formed streams in {elapsed:.1f} s; "
          f"error codes {codes}")
    assert not failures, failures[:5]
    assert sent[0] >= min(N_FUZZ, 100), f"only {sent[0]} fuzz requests in {TIME_BUDGET_S} s"
    for (k, rep), res in got.items():
        assert res == solo[k], (WELL_FORMED[k], rep, res, solo[k])
    assert all((k, 1) in got for k in range(len(WELL_FORMED)))
    h = httpx.get(srv.url + "/health").json()
    assert h["status"] == "ok"
    t1 = time.monotonic()
    while (srv.engine.active or srv.engine.queued) and time.monotonic() - t1 < 30:
        time.sleep(0.05)
    assert srv.engine.active == 0 and srv.engine.queued == 0
