"""`fusesteer serve --plans DIR --watch` (issue 24, replicas): two servers watch one plan folder; files added,
replaced, deleted, corrupted or still being written there are served, updated, removed or refused within
``BOUND`` seconds on both. Checked through /v1/steering/plans and real completions (the real `openai` client),
each steered answer equal to the same plan attached with ``fs.attach`` alone on a third copy of the model.
The folder rules themselves (stability, limits, name clashes) are checked on :class:`PlanWatcher` directly,
poll by poll, without timing.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_helpers import greedy_alone, serve_process, stop_process, wait_healthy  # noqa: E402

import fusesteer as fs  # noqa: E402
from fusesteer.interop.gguf_cv import write_control_vector  # noqa: E402
from fusesteer.runtime.plan import ModelSpec  # noqa: E402
from fusesteer.serve.registry import PlanRegistry  # noqa: E402
from fusesteer.serve.server import Server, ServerConfigError  # noqa: E402
from fusesteer.serve.watch import PlanWatcher  # noqa: E402

NAME = "tiny"
INTERVAL = 0.1
BOUND = 5.0
N = 8
PROMPT = "The capital of France is"


def tiny(tok):
    return fs.testing.tiny("llama", vocab_size=len(tok), max_position_embeddings=256)  # same weights every time


def make_plan(model, seed: int) -> fs.SteeringPlan:
    g = torch.Generator().manual_seed(seed)
    h = model.config.hidden_size
    p = fs.SteeringPlan.for_model(model, name=f"p{seed}")
    p.add(layer=1, site="layer.out", b=4 * torch.randn(h, generator=g))
    p.add(layer=2, site="layer.out", b=4 * torch.randn(h, generator=g))
    return p


def plan_bytes(plan, tmp_path, kind="safetensors") -> bytes:
    f = tmp_path / f"scratch.{kind}"
    if kind == "gguf":
        write_control_vector(plan, f)
    else:
        plan.save(f)
    return f.read_bytes()


def put(folder, fname: str, data: bytes) -> None:
    """Write a file the way a deploy tool should: a hidden temporary file, then an atomic rename into place."""
    tmp = folder / f".{fname}.part"
    tmp.write_bytes(data)
    os.replace(tmp, folder / fname)


def wait_for(cond, what: str, bound: float = BOUND) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < bound, f"not within {bound} s: {what}"
        time.sleep(0.02)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def tok():
    return fs.models.load("smollm2-135m", progress=False)[1]


@pytest.fixture(scope="module")
def env(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shared-plans")
    scratch = tmp_path_factory.mktemp("scratch")
    ref = tiny(tok)
    put(folder, "base.safetensors", plan_bytes(make_plan(ref, 1), scratch))
    servers = [Server(tiny(tok), tok, NAME, plans_dir=folder, port=0, backend="torch", max_batch=4, max_tokens=32,
                      plan_slots=8, watch=True, watch_interval=INTERVAL).start() for _ in range(2)]
    for s in servers:
        s.client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
    yield {"folder": folder, "scratch": scratch, "ref": ref, "servers": servers, "tok": tok}
    for s in servers:
        s.stop()


def alone(env, plan) -> list[int]:
    """Greedy tokens of PROMPT with ``plan`` attached by itself (fs.attach) on the reference copy."""
    return greedy_alone(env["ref"], env["tok"](PROMPT)["input_ids"], plan, N)


def served(srv, plan_name) -> list[int]:
    extra = {"return_token_ids": True, "ignore_eos": True}
    if plan_name is not None:
        extra["steering"] = {"plan": plan_name}
    r = srv.client.completions.create(model=NAME, prompt=PROMPT, max_tokens=N, temperature=0, extra_body=extra)
    return r.choices[0].model_extra["token_ids"]


def listing(srv) -> dict:
    r = httpx.get(srv.url + "/v1/steering/plans", timeout=30)
    assert r.status_code == 200, r.text
    return {d["name"]: d for d in r.json()["data"]}


def usable_everywhere(env, name, version_above=0):
    return all((d := listing(s).get(name)) is not None and d["usable"] and d["version"] > version_above
               for s in env["servers"])


def test_folder_plans_are_served_by_both_replicas_at_start(env):
    want = alone(env, make_plan(env["ref"], 1))
    assert want != alone(env, None)  # the plan changes the answer
    for s in env["servers"]:
        assert listing(s)["base"]["source"].startswith("dir:")
        assert served(s, "base") == want


def test_added_files_are_served_by_every_replica(env):
    folder, scratch = env["folder"], env["scratch"]
    added, cv = make_plan(env["ref"], 2), make_plan(env["ref"], 3)
    put(folder, "added.safetensors", plan_bytes(added, scratch))
    put(folder, "cv.gguf", plan_bytes(cv, scratch, "gguf"))  # a GGUF control vector, named by its stem
    took = wait_for(lambda: usable_everywhere(env, "added") and usable_everywhere(env, "cv"), "added and cv served")
    print(f"added files served by both replicas after {took:.2f} s")
    a, b = (listing(s) for s in env["servers"])
    for name in ("added", "cv"):
        assert {k: a[name][k] for k in ("fingerprint", "entries", "sites", "layers", "format")} == \
               {k: b[name][k] for k in ("fingerprint", "entries", "sites", "layers", "format")}
    assert a["cv"]["format"] == "gguf"
    want_added, want_cv = alone(env, added), alone(env, cv)
    assert want_added != want_cv
    for s in env["servers"]:
        assert served(s, "added") == want_added
        assert served(s, "cv") == want_cv


def test_replaced_file_updates_the_plan_and_requests_in_flight_keep_theirs(env):
    folder, scratch, (a, b) = env["folder"], env["scratch"], env["servers"]
    old_plan, new_plan = make_plan(env["ref"], 1), make_plan(env["ref"], 4)
    v0 = max(listing(s)["base"]["version"] for s in env["servers"])
    # a stream on the old version whose next forwards wait until the new version is in the registry: it is
    # certainly in flight across the replacement (the watcher does not need the engine loop to make progress)
    go, prepare, calls = threading.Event(), a.steerer.prepare, []

    def held(*args):  # the prefill and one decode step run; the third forward waits
        calls.append(1)
        if len(calls) > 2:
            go.wait(BOUND)
        return prepare(*args)

    a.steerer.prepare = held
    try:
        stream = a.client.completions.create(model=NAME, prompt=PROMPT, max_tokens=N, temperature=0, stream=True,
                                             extra_body={"steering": {"plan": "base"}, "ignore_eos": True})
        first = next(iter(stream))
        put(folder, "base.safetensors", plan_bytes(new_plan, scratch))
        took = wait_for(lambda: usable_everywhere(env, "base", v0), "the new base served")
        assert a.engine.active == 1  # the old-version stream is still decoding
    finally:
        go.set()
        a.steerer.prepare = prepare
    print(f"replaced file served by both replicas after {took:.2f} s")
    text = first.choices[0].text + "".join(c.choices[0].text for c in stream if c.choices)
    assert text == env["tok"].decode(alone(env, old_plan))  # started on the old version: kept it to the end
    want = alone(env, new_plan)
    assert want != alone(env, old_plan)
    for s in (a, b):
        assert served(s, "base") == want


def test_deleted_file_removes_the_plan(env):
    folder, scratch = env["folder"], env["scratch"]
    put(folder, "gone.safetensors", plan_bytes(make_plan(env["ref"], 5), scratch))
    wait_for(lambda: usable_everywhere(env, "gone"), "gone served")
    (folder / "gone.safetensors").unlink()
    took = wait_for(lambda: all("gone" not in listing(s) for s in env["servers"]), "gone removed")
    print(f"deleted file removed on both replicas after {took:.2f} s")
    for s in env["servers"]:
        with pytest.raises(openai.BadRequestError) as e:
            served(s, "gone")
        assert e.value.code == "plan_not_found"
        assert httpx.get(s.url + "/v1/steering/plans/gone").status_code == 404


def test_corrupted_replacement_is_refused_and_the_previous_version_keeps_serving(env, caplog):
    caplog.set_level(logging.WARNING, logger="fusesteer.serve")
    folder, scratch = env["folder"], env["scratch"]
    good, fixed = make_plan(env["ref"], 6), make_plan(env["ref"], 7)
    put(folder, "keep.safetensors", plan_bytes(good, scratch))
    wait_for(lambda: usable_everywhere(env, "keep"), "keep served")
    before = {id(s): listing(s)["keep"] for s in env["servers"]}
    data = plan_bytes(good, scratch)
    put(folder, "keep.safetensors", data[: len(data) // 2])  # a half-written copy, renamed into place anyway
    refused = lambda: sum("keep" in r.getMessage() and "previous version" in r.getMessage()  # noqa: E731
                          for r in caplog.records) >= 2
    took = wait_for(refused, "the corrupted keep refused on both replicas (log)")
    print(f"corrupted replacement refused on both replicas after {took:.2f} s")
    want = alone(env, good)
    for s in env["servers"]:
        assert listing(s)["keep"] == before[id(s)]  # same version, same plan
        assert served(s, "keep") == want
    put(folder, "keep.safetensors", plan_bytes(fixed, scratch))  # a good file again: picked up
    wait_for(lambda: usable_everywhere(env, "keep", max(d["version"] for d in before.values())), "fixed keep")
    for s in env["servers"]:
        assert served(s, "keep") == alone(env, fixed)
    # a bad file under a new name: listed as unusable with the reason; a request naming it gets a 400
    put(folder, "broken.safetensors", b"not a plan at all")
    wait_for(lambda: all("broken" in listing(s) for s in env["servers"]), "broken listed")
    for s in env["servers"]:
        assert listing(s)["broken"]["usable"] is False and listing(s)["broken"]["error"]
        with pytest.raises(openai.BadRequestError) as e:
            served(s, "broken")
        assert e.value.code == "plan_not_usable"


def test_file_being_written_is_never_served_half(env, caplog):
    """A file written in place, a piece every INTERVAL / 10: never served before it is complete (the stability
    rule keeps it unread while it grows; a writer that pauses for two polls gets its part refused, logged, and
    read again once it changes), then served. The rule itself is tested poll by poll below."""
    caplog.set_level(logging.WARNING, logger="fusesteer.serve")
    folder, plan = env["folder"], make_plan(env["ref"], 8)
    data = plan_bytes(plan, env["scratch"])
    step = max(1, len(data) // 40)
    with open(folder / "slow.safetensors", "wb") as f:
        for i in range(0, len(data), step):
            f.write(data[i:i + step])
            f.flush()
            for s in env["servers"]:
                rec = s.registry.get("slow")
                assert rec is None or rec.plan is None
            time.sleep(INTERVAL / 10)
    wait_for(lambda: usable_everywhere(env, "slow"), "slow served")
    for s in env["servers"]:
        assert served(s, "slow") == alone(env, plan)
    refused = sum("'slow'" in r.getMessage() for r in caplog.records)
    print(f"slow file: {refused} partial read(s) refused while it was written (0 unless the writer stalled)")


def test_uploads_and_files_sharing_a_name(env):
    folder, scratch, (a, b) = env["folder"], env["scratch"], env["servers"]
    up, filed, up2 = make_plan(env["ref"], 9), make_plan(env["ref"], 10), make_plan(env["ref"], 11)

    def upload(srv, name, plan, replace=False):
        r = httpx.post(srv.url + f"/v1/steering/plans?name={name}&replace={str(replace).lower()}",
                       content=plan_bytes(plan, scratch), timeout=30)
        assert r.status_code == 201, r.text

    upload(a, "apionly", up)  # no file has this name: the watcher never touches it
    upload(a, "shared", up)
    put(folder, "shared.safetensors", plan_bytes(filed, scratch))  # a file appears: it takes the name
    wait_for(lambda: all(listing(s).get("shared", {}).get("source", "").startswith("dir:") for s in (a, b)),
             "the file takes 'shared'")  # b has no 'shared' until its watcher reads the file
    assert served(a, "shared") == served(b, "shared") == alone(env, filed)
    upload(a, "shared", up2, replace=True)  # an upload with replace=true wins until the file next changes
    (folder / "shared.safetensors").unlink()  # deleting the file then leaves the uploaded plan
    wait_for(lambda: "shared" not in listing(b), "shared removed where it came from the file")
    polls = a.watcher.polls
    wait_for(lambda: a.watcher.polls >= polls + 3, "three more polls")
    assert listing(a)["shared"]["source"] == "upload"
    assert served(a, "shared") == alone(env, up2)
    assert listing(a)["apionly"]["source"] == "upload"


# ---- the watcher alone, poll by poll ---------------------------------------------------------------


@pytest.fixture
def reg(tok):
    return PlanRegistry(ModelSpec.from_model(tiny(tok)))


def test_poll_reads_a_file_only_after_two_polls_see_it_unchanged(reg, tok, tmp_path):
    d = tmp_path / "plans"
    d.mkdir()
    data = plan_bytes(make_plan(tiny(tok), 1), tmp_path)
    w = PlanWatcher(reg, d)
    assert w.load() == []
    (d / "a.safetensors").write_bytes(data[:100])
    assert w.poll() == []  # first sight
    with open(d / "a.safetensors", "ab") as f:
        f.write(data[100:])
    assert w.poll() == [] and reg.get("a") is None  # changed since: still not read
    assert w.poll() == ["a"] and reg.get("a").plan is not None
    v = reg.get("a").version
    assert w.poll() == [] and reg.get("a").version == v  # unchanged file: not read again
    os.unlink(d / "a.safetensors")  # delete, then write again before the next poll: a replacement, never a gap
    assert w.poll() == [] and reg.get("a").version == v
    put(d, "a.safetensors", data)
    assert w.poll() == [] and reg.get("a").version == v
    assert w.poll() == ["a"] and reg.get("a").version > v


def test_poll_limits_clashes_and_an_unlistable_folder(tok, tmp_path):
    model = tiny(tok)
    d = tmp_path / "plans"
    d.mkdir()
    big = plan_bytes(make_plan(model, 1), tmp_path)
    reg = PlanRegistry(ModelSpec.from_model(model), max_plan_bytes=len(big) - 1)
    small = fs.SteeringPlan.for_model(model, name="small")
    small.add(layer=1, site="layer.out", b=torch.ones(model.config.hidden_size))
    put(d, "big.safetensors", big)  # over --max-plan-bytes: refused without being read
    put(d, "x.safetensors", plan_bytes(small, tmp_path))
    put(d, "x.gguf", plan_bytes(small, tmp_path, "gguf"))  # same stem: x.gguf comes first in sorted order
    put(d, ".hidden.safetensors", big)  # not a valid plan name: skipped
    w = PlanWatcher(reg, d)
    w.load()
    assert reg.names() == ["big", "x"]
    assert reg.get("big").plan is None and "byte limit" in reg.get("big").error
    assert reg.get("x").kind == "gguf"
    os.unlink(d / "x.gguf")  # the other file with that stem takes over
    w.poll(), w.poll()
    assert reg.get("x").kind == "fusesteer" and reg.get("x").plan is not None
    moved = tmp_path / "away"
    os.replace(d, moved)  # the folder cannot be listed: nothing is removed
    w.poll(), w.poll()
    assert reg.names() == ["big", "x"]
    os.replace(moved, d)
    os.unlink(d / "x.safetensors")
    w.poll(), w.poll()
    assert reg.names() == ["big"]


def test_watch_needs_a_folder_and_a_positive_interval(tok, tmp_path):
    from fusesteer.cli import main

    assert main(["serve", "--watch"]) == 2
    assert main(["serve", "--plans", str(tmp_path), "--watch", "--watch-interval", "0"]) == 2
    with pytest.raises(ServerConfigError):
        Server(tiny(tok), tok, NAME, port=0, watch=True)


def test_fusesteer_serve_watch_command(tok, tmp_path):
    """`fusesteer serve --plans DIR --watch --watch-interval 0.1` as a process: a file added, then deleted."""
    model = tiny(tok)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    plans = tmp_path / "plans"
    plans.mkdir()
    proc, url = serve_process(["--model", tmp_path / "model", "--plans", plans, "--watch", "--watch-interval",
                               INTERVAL, "--max-batch", "2", "--threads", "1"], tmp_path / "serve.log")

    def names():
        return [d["name"] for d in httpx.get(url + "/v1/steering/plans", timeout=10).json()["data"]]

    try:
        wait_healthy(proc, url, tmp_path / "serve.log", 120)
        assert names() == []
        put(plans, "late.safetensors", plan_bytes(make_plan(model, 12), tmp_path))
        wait_for(lambda: names() == ["late"], "late served by the command")
        (plans / "late.safetensors").unlink()
        wait_for(lambda: names() == [], "late removed by the command")
    finally:
        stop_process(proc)
    out = (tmp_path / "serve.log").read_text()
    assert "watching" in out and "removed" in out, out
