"""`fusesteer serve --tp 2`: the server on two processes (transformers' tensor parallelism, gloo on CPU, under
torchrun), checked from outside with the real `openai` client: concurrent requests over several plans (at
sharded and replicated sites, prompt and generated gating) and unsteered ones each equal the answer of the
same plan on one process; a plan uploaded, used and deleted; /health reports the world size; a rank killed
mid-request stops the server with a non-zero exit code within ``BOUND`` seconds (no hang).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_helpers import descendants, free_port, greedy_alone, serve_process, stop_process, wait_healthy  # noqa: E402

import fusesteer as fs  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="torch.distributed with gloo is not available"),
    pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the ranks' processes through /proc"),
]

N = 8
BOUND = 60.0
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "Steering vectors are"]


def make_plan(model, seed: int) -> fs.SteeringPlan:
    """Entries at the sharded sites (attn.o_proj.in, mlp.down_proj.in) and a replicated one, mixed gating."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    h, f = cfg.hidden_size, cfg.intermediate_size
    p = fs.SteeringPlan.for_model(model, name=f"p{seed}")
    p.add(layer=0, site="attn.o_proj.in", a=1 + 0.5 * torch.rand(h, generator=g), b=torch.randn(h, generator=g))
    p.add(layer=1, site="mlp.down_proj.in", a=1 + 0.5 * torch.rand(f, generator=g), b=torch.randn(f, generator=g),
          gating="generated")
    p.add(layer=1, site="layer.out", b=3 * torch.randn(h, generator=g), gating="prompt")
    return p


def rank_pid(root: int, rank: int) -> int:
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID=" in b"\n".join(env):
            return pid
    raise AssertionError(f"no process of rank {rank} under {root}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-tp")
    tok = fs.models.load("smollm2-135m", progress=False)[1]
    model = fs.testing.tiny("llama", vocab_size=len(tok), max_position_embeddings=256)
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    (tmp / "plans").mkdir()
    plans = {f"p{s}": make_plan(model, s) for s in (1, 2)}
    for name, p in plans.items():
        p.save(tmp / "plans" / f"{name}.safetensors")
    proc, url = serve_process(["--tp", "2", "--model", tmp / "model", "--plans", tmp / "plans", "--max-batch", "4",
                               "--threads", "1", "--backend", "torch", "--tp-timeout", "30"], tmp / "serve.log",
                              OMP_NUM_THREADS="1")
    try:
        wait_healthy(proc, url, tmp / "serve.log", 180)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        yield {"proc": proc, "url": url, "client": client, "model": model, "tok": tok, "plans": plans, "tmp": tmp,
               "log": tmp / "serve.log"}
    finally:
        stop_process(proc, signal.SIGINT)


def ask(srv, prompt: str, plan: str | None) -> list[int]:
    extra = {"return_token_ids": True, "ignore_eos": True}
    if plan is not None:
        extra["steering"] = {"plan": plan}
    r = srv["client"].completions.create(model="model", prompt=prompt, max_tokens=N, temperature=0, extra_body=extra)
    return r.choices[0].model_extra["token_ids"]


def alone(srv, prompt: str, plan) -> list[int]:
    return greedy_alone(srv["model"], srv["tok"](prompt)["input_ids"], plan, N, exact=True)


def test_health_reports_the_world_size(served):
    body = httpx.get(served["url"] + "/health", timeout=10).json()
    assert body["status"] == "ok" and body["world_size"] == 2


def test_concurrent_requests_over_several_plans_equal_one_process(served):
    jobs = [(p, name) for p in PROMPTS for name in ("p1", "p2", None)]
    want = [alone(served, p, served["plans"].get(name)) for p, name in jobs]
    got: list = [None] * len(jobs)

    def one(i):
        got[i] = ask(served, *jobs[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for (prompt, name), w, g in zip(jobs, want, got):
        assert g == w, (prompt, name)
    assert len({tuple(g) for g, (p, _) in zip(got, jobs) if p == PROMPTS[0]}) == 3  # the plans change the answer


def test_upload_use_delete_a_plan_reaches_every_rank(served):
    plan = make_plan(served["model"], 7)
    f = served["tmp"] / "up.safetensors"
    plan.save(f)
    r = httpx.post(served["url"] + "/v1/steering/plans?name=up", content=f.read_bytes(), timeout=30)
    assert r.status_code == 201, r.text
    assert ask(served, PROMPTS[1], "up") == alone(served, PROMPTS[1], plan)
    assert httpx.delete(served["url"] + "/v1/steering/plans/up", timeout=30).status_code == 200
    with pytest.raises(openai.BadRequestError, match="unknown steering plan"):
        ask(served, PROMPTS[1], "up")
    assert ask(served, PROMPTS[1], None) == alone(served, PROMPTS[1], None)


def test_bad_requests_beside_good_ones_get_400_and_change_nothing(served):
    """Malformed and extreme requests sent while good steered ones run: each gets a 400 naming what is wrong, the
    good answers equal one process, and the server stays healthy (no rank is left behind)."""
    vocab = len(served["tok"])
    bad = [b"{not json", {"prompt": "x", "max_tokens": 4, "steering": {"plan": "nope"}},
           {"prompt": "x", "max_tokens": 4, "steering": {"plan": "p1", "scale": 1e30}},
           {"prompt": "x", "max_tokens": 10 ** 9}, {"prompt": "x", "max_tokens": 4, "temperature": -1},
           {"prompt": [1, vocab + 5], "max_tokens": 4}, {"prompt": "x", "max_tokens": 4, "steering": 7}]
    codes: list = [None] * len(bad)
    good: list = [None] * len(PROMPTS)

    def send_bad(i):
        body = bad[i]
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else \
            {"json": {"model": "model", **body}}
        codes[i] = httpx.post(served["url"] + "/v1/completions", timeout=60, **kw).status_code

    def send_good(i):
        good[i] = ask(served, PROMPTS[i], "p1")

    threads = [threading.Thread(target=send_good, args=(i,)) for i in range(len(PROMPTS))]
    threads += [threading.Thread(target=send_bad, args=(i,)) for i in range(len(bad))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert codes == [400] * len(bad), codes
    for p, g in zip(PROMPTS, good):
        assert g == alone(served, p, served["plans"]["p1"]), p
    assert httpx.get(served["url"] + "/health", timeout=10).json()["status"] == "ok"


def _stream_then_kill(served, victim: int) -> tuple[threading.Thread, dict]:
    """A long streamed request; ``victim`` is killed once it runs."""
    outcome: dict = {}

    def stream():
        try:
            s = served["client"].completions.create(model="model", prompt=PROMPTS[0], max_tokens=200, stream=True,
                                                    extra_body={"ignore_eos": True, "steering": {"plan": "p1"}})
            outcome["chunks"] = sum(1 for _ in s)
        except Exception as e:  # noqa: BLE001 - any error is fine; a hang is not
            outcome["error"] = e

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    time.sleep(1.0)
    os.kill(victim, signal.SIGKILL)
    return t, outcome


def test_a_killed_rank_stops_the_server_with_an_error(served):
    """Under torchrun (what ``--tp 2`` runs). Last of the tests on this server: it ends it."""
    proc = served["proc"]
    victim = rank_pid(proc.pid, 1)
    t, _ = _stream_then_kill(served, victim)
    t0 = time.monotonic()
    try:
        rc = proc.wait(timeout=BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server still runs {BOUND} s after rank 1 was killed:\n{served['log'].read_text()[-3000:]}")
    took = time.monotonic() - t0
    t.join(BOUND)
    assert not t.is_alive(), "the client's request hung after the rank died"
    assert rc != 0, served["log"].read_text()[-3000:]
    text = served["log"].read_text()
    assert "tensor-parallel rank" in text or f"pid: {victim}" in text, text[-3000:]
    assert took < BOUND


@pytest.mark.parametrize("victim", [1, 0])
def test_without_torchrun_each_rank_sees_a_dead_rank_itself(served, tmp_path, victim):
    """The ranks started by hand (any launcher sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT): nothing but
    fusesteer notices that a rank died. Rank 1 killed: rank 0 fails the open request, logs why and exits with
    code 1. Rank 0 killed: rank 1 logs why and exits with code 1."""
    tmp = served["tmp"]
    port, master = free_port(), free_port()
    procs = []
    for rank in range(2):
        procs.append(serve_process(["--model", tmp / "model", "--plans", tmp / "plans", "--max-batch", "4", "--threads",
                                    "1", "--backend", "torch", "--tp-timeout", "30"], tmp_path / f"rank{rank}.log",
                                   port, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master), OMP_NUM_THREADS="1")[0])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(procs[0], url, tmp_path / "rank0.log", 180)
        here = dict(served, url=url, client=openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                                                          timeout=120))
        assert ask(here, PROMPTS[2], "p2") == alone(here, PROMPTS[2], served["plans"]["p2"])
        t, outcome = _stream_then_kill(here, procs[victim].pid)
        other = 1 - victim
        try:
            rc = procs[other].wait(timeout=BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank {other} still runs {BOUND} s after rank {victim} died:\n"
                        f"{(tmp_path / f'rank{other}.log').read_text()}")
        t.join(BOUND)
        assert not t.is_alive(), "the client's request hung after the rank died"
        text = (tmp_path / f"rank{other}.log").read_text()
        assert rc == 1, text[-3000:]
        want = "a tensor-parallel rank failed or stopped answering" if other == 0 else "rank 1: stopping (exit code 1)"
        assert want in text, text[-3000:]
        assert "error" in outcome or outcome.get("chunks", 200) < 200, outcome
    finally:
        for p in procs:
            stop_process(p, signal.SIGKILL, grace=10)
