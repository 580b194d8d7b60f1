"""`fusesteer serve` on the generic path: a model without a family adapter (a tiny Cohere saved to a folder, with
SmolLM2's tokenizer) is served through the reference backend, which ``runtime.backends.resolve`` picks for
``auto``. Steered and unsteered answers, concurrent (one batch) and from the `fusesteer serve` command itself,
are compared token for token with the same request run alone with ``fs.attach`` + ``generate()``."""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from serve_helpers import greedy_alone, serve_process, stop_process, wait_healthy  # noqa: E402

import fusesteer as fs  # noqa: E402
from fusesteer.runtime.backends import resolve  # noqa: E402
from fusesteer.serve.server import Server  # noqa: E402

N = 8
PROMPTS = ["The capital of France is", "Once upon a time", "Hello, my name is", "Water boils at"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Cohere (no family adapter) saved as a Hugging Face folder, and a plans folder with one plan."""
    tok = fs.models.load("smollm2-135m", progress=False)[1]
    root = tmp_path_factory.mktemp("generic")
    model = fs.testing.tiny("cohere", vocab_size=len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    plan = fs.SteeringPlan.for_model(model, name="lift")
    g = torch.Generator().manual_seed(3)
    plan.add(layer=1, site="layer.out", b=4 * torch.randn(model.config.hidden_size, generator=g))
    plan.add(layer=2, site="mlp.out", b=2 * torch.randn(model.config.hidden_size, generator=g), gating="generated")
    (root / "plans").mkdir()
    plan.save(root / "plans" / "lift.safetensors")
    return {"model": root / "model", "plans": root / "plans", "plan": plan}


@pytest.fixture(scope="module")
def ref(folder):
    model, tok = fs.models.load(folder["model"], progress=False)
    model.generation_config.eos_token_id = None  # exactly N tokens, as the server with ignore_eos
    return model, tok


def alone(ref, prompt, plan):
    model, tok = ref
    return greedy_alone(model, tok(prompt)["input_ids"], plan, N, backend="reference")


def complete(url, prompt, steering=None):
    body = {"model": "c", "prompt": prompt, "max_tokens": N, "temperature": 0, "return_token_ids": True,
            "ignore_eos": True}
    if steering is not None:
        body["steering"] = steering
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_server_object_answers_steered_and_unsteered_rows_in_one_batch(folder, ref):
    model, tok = fs.models.load(folder["model"], progress=False)
    assert resolve("auto", model, per_row=True) == "reference"
    srv = Server(model, tok, "c", plans_dir=folder["plans"], port=0, max_batch=4, max_tokens=32).start()
    try:
        assert srv.steerer.backend == "reference"
        specs = [None, {"plan": "lift"}, {"plan": "lift", "scale": 0.5}, None]
        got: dict[int, list] = {}

        def go(i):
            got[i] = complete(srv.url, PROMPTS[i], specs[i])

        threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        plan = folder["plan"]
        want = [alone(ref, PROMPTS[i], None if specs[i] is None else plan.scaled(specs[i].get("scale", 1.0)))
                for i in range(4)]
        assert [got[i] for i in range(4)] == want
        assert want[1] != alone(ref, PROMPTS[1], None), "the plan does not change this model's answer"
        for label in ("lift", "none"):  # the plan label names plans, not scales
            assert srv.metrics.value("fusesteer_requests_total", endpoint="completions", plan=label, status="ok") == 2
    finally:
        srv.stop()


def test_fusesteer_serve_command_starts_and_answers(folder, ref, tmp_path):
    proc, url = serve_process(["--model", folder["model"], "--plans", folder["plans"], "--served-name", "c",
                               "--max-batch", "2", "--threads", "1"], tmp_path / "serve.log")
    try:
        wait_healthy(proc, url, tmp_path / "serve.log", 180)
        assert complete(url, PROMPTS[0]) == alone(ref, PROMPTS[0], None)
        assert complete(url, PROMPTS[1], {"plan": "lift", "scale": 0.8}) == alone(ref, PROMPTS[1],
                                                                                 folder["plan"].scaled(0.8))
        metrics = httpx.get(url + "/metrics", timeout=10).text
        assert 'fusesteer_requests_total{endpoint="completions",plan="lift",status="ok"} 1.0' in metrics
    finally:
        stop_process(proc)
    out = (tmp_path / "serve.log").read_text()
    assert "backend reference" in out, out
