"""`fusesteer bench serve`: load test of `fusesteer serve` on loopback: aggregate throughput and latency under
concurrent clients.

    fusesteer bench serve [--model smollm2-135m] [--clients 1 8 32] [--requests 2] [--max-tokens 32]
                          [--arm-time-cap 180] [--out DIR] [--quick]

``--out`` defaults to ``serve/`` in the results folder (:mod:`fusesteer.bench.paths`: ``bench/results/serve``
inside a checkout, else ``./fusesteer-bench-results/serve``).

Starts ``fusesteer serve`` as a subprocess on 127.0.0.1 (a free port; nothing else is contacted) with one plan
per client (all-layer ``layer.out`` blend + k = 100 gains at ``attn.o_proj.in`` and ``mlp.down_proj.in``,
``fusesteer.bench.common.per_row_plans``). For each number of concurrent clients it runs two arms, interleaved:

* ``unsteered``: every request without steering;
* ``steered``: client i always asks for plan ``row{i}``, so a batch holds as many different plans as clients;

each client sends ``--requests`` streaming greedy requests one after another (``ignore_eos``: every request
generates exactly ``--max-tokens`` tokens). With ``--peer`` every arm stops at EOS instead, since the peer
cannot ignore it: greedy requests to the same model then generate the same tokens on both servers, and every
arm's tokens are counted as streamed. Aggregate tokens/s = all generated tokens / the arm's wall time;
TTFT = send -> first streamed token; ITL = time between streamed tokens. Then the same server with
``--max-batch 1`` (one request at a time) runs the 8-client steered arm for the speedup of batching.
Bounded: a fixed number of requests per arm, no new request after ``--arm-time-cap`` seconds, and a
``--max-tokens`` cap per request. Writes serve.json (numbers, machine, command) and serve.png.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import BenchError
from .paths import PACKAGE_PARENT, resolve_out
from .report import plots_unavailable

HOST = "127.0.0.1"
PROMPTS = ["Tell me about the history of the city of", "Write a short story about a robot who", "Explain why the sky",
           "The most important thing to know about cooking is", "Give three tips for learning to play the",
           "Describe a day in the life of a", "What are the benefits of regular", "Once upon a time in a small"]


LONG_STREAM_TOKENS = 256  # tokens of each running stream in the --long-prompt measurement
LONG_STREAMS = 4  # running streams in the --long-prompt measurement


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class ServerProc:
    """`fusesteer serve` in a subprocess, listening on 127.0.0.1 only."""

    def __init__(self, model: str, plans: str, max_batch: int, max_tokens: int, backend: str, threads: int | None,
                 log_path: Path, extra: list | None = None):
        self.port = _free_port()
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        # the server imports this very fusesteer (installed or a checkout)
        env["PYTHONPATH"] = str(PACKAGE_PARENT) + os.pathsep + env.get("PYTHONPATH", "")
        self.cmd = [sys.executable, "-m", "fusesteer.cli", "serve", "--model", model, "--plans", plans,
                    "--host", HOST, "--port", str(self.port), "--max-batch", str(max_batch),
                    "--max-queue", "1024", "--max-tokens", str(max_tokens), "--backend", backend]
        if threads:
            self.cmd += ["--threads", str(threads)]
        self.cmd += list(extra or [])
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def wait_ready(self, timeout: float = 300.0) -> None:
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server did not come up in {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:  # our own child, by its process object
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


class PeerProc(ServerProc):
    """``transformers serve MODEL_DIR --continuous-batching`` (the peer arm) on 127.0.0.1, offline."""

    def __init__(self, model_dir: str, threads: int | None, log_path: Path, compile: bool = False):
        self.port = _free_port()
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        exe = Path(sys.executable).with_name("transformers")
        self.cmd = [str(exe), "serve", model_dir, "--continuous-batching", "--host", HOST, "--port", str(self.port)]
        if compile:
            self.cmd.append("--compile")
        self.model_id = model_dir
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 300.0) -> None:
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"transformers serve did not come up in {timeout:.0f} s; see {self.log.name}")


async def _one(client, url: str, model: str, prompt: str, plan: str | None, max_tokens: int,
               scale: float | None = None, ignore_eos: bool = True) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if ignore_eos:  # fusesteer's extension (the peer refuses unknown fields)
        body["ignore_eos"] = True
    if plan is not None:
        body["steering"] = {"plan": plan} if scale is None else {"plan": plan, "scale": scale}
    t0 = time.perf_counter()
    stamps, n = [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])
            if "error" in ch:
                raise RuntimeError(f"stream error: {ch['error']}")
            if ch["choices"] and ch["choices"][0].get("text"):
                stamps.append(time.perf_counter())
                n += 1
    return {"t0": t0, "stamps": stamps, "t_end": time.perf_counter()}


async def _arm(url: str, model: str, clients: int, requests: int, max_tokens: int, steered: bool,
               time_cap: float, usage_tokens, name: str | None = None, stop_at_eos: bool = False) -> dict:
    """``name``: an arm of another server (the peer), which stops at EOS; ``stop_at_eos``: so do this arm's
    requests. Either way the tokens are counted from the streamed chunks, not assumed to be ``max_tokens``."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    results = []
    t_start = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker(i):
            rng = random.Random(i)
            for _ in range(requests):
                if time.perf_counter() - t_start > time_cap:
                    return
                results.append(await _one(client, url, model, rng.choice(PROMPTS), f"row{i}" if steered else None,
                                          max_tokens, ignore_eos=name is None and not stop_at_eos))

        await asyncio.gather(*(worker(i) for i in range(clients)))
    wall = time.perf_counter() - t_start
    ttft = [r["stamps"][0] - r["t0"] for r in results if r["stamps"]]
    itl = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    chunks = sum(len(r["stamps"]) for r in results)
    # ignore_eos: every fusesteer request generates exactly max_tokens; otherwise they are counted
    tokens = chunks if name or stop_at_eos else len(results) * max_tokens
    return {"clients": clients, "arm": name or ("steered" if steered else "unsteered"), "requests": len(results),
            "tokens": tokens, "chunks": chunks, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_s": _pct(ttft, 0.5), "ttft_p99_s": _pct(ttft, 0.99),
            "itl_p50_s": _pct(itl, 0.5), "itl_p99_s": _pct(itl, 0.99), "_ttft": ttft, "_itl": itl}


def _pool(arms: list[dict]) -> list[dict]:
    """All rounds of one (clients, arm) together: tokens / total wall time, percentiles over all samples."""
    groups: dict = {}
    for a in arms:
        groups.setdefault((a["clients"], a["arm"]), []).append(a)
    out = []
    for (c, arm), xs in sorted(groups.items()):
        ttft = [v for a in xs for v in a["_ttft"]]
        itl = [v for a in xs for v in a["_itl"]]
        tokens, wall = sum(a["tokens"] for a in xs), sum(a["wall_s"] for a in xs)
        requests = sum(a["requests"] for a in xs)
        out.append({"clients": c, "arm": arm, "rounds": len(xs), "requests": requests, "tokens": tokens,
                    "tokens_per_request": round(tokens / max(1, requests), 1), "wall_s": round(wall, 3),
                    "tokens_per_s": round(tokens / wall, 2),
                    "ttft_p50_s": _pct(ttft, 0.5), "ttft_p99_s": _pct(ttft, 0.99),
                    "itl_p50_s": _pct(itl, 0.5), "itl_p99_s": _pct(itl, 0.99),
                    "forward_share_of_step": _mean([a.get("forward_share_of_step") for a in xs])})
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 3) if xs else None


async def _first_use(url: str, model: str) -> dict:
    """TTFT of a steering the plan table does not hold yet (add_plan on the request path) vs the same again."""
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        cold = await _one(client, url, model, PROMPTS[0], "row0", 4, scale=0.37)
        warm = await _one(client, url, model, PROMPTS[0], "row0", 4, scale=0.37)
    return {"cold_ttft_s": round(cold["stamps"][0] - cold["t0"], 4),
            "warm_ttft_s": round(warm["stamps"][0] - warm["t0"], 4)}


async def _long_prompt_itl(url: str, model: str, prompt_tokens: int, streams: int = LONG_STREAMS) -> dict:
    """ITL of ``streams`` running requests while a ``prompt_tokens``-token prompt arrives (from its send to its
    first token), and that prompt's TTFT."""
    import httpx

    long_prompt = " ".join(["word"] * prompt_tokens)  # one token per word with SmolLM2's tokenizer (+-1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        runs = [asyncio.create_task(_one(client, url, model, PROMPTS[i % len(PROMPTS)], None, LONG_STREAM_TOKENS))
                for i in range(streams)]
        await asyncio.sleep(1.0)
        t0 = time.perf_counter()
        big = await _one(client, url, model, long_prompt, None, 1)
        t1 = big["stamps"][0] if big["stamps"] else time.perf_counter()
        done = await asyncio.gather(*runs)
    # every gap between two tokens of a running stream that overlaps [send, first token of the long prompt]
    itl = [b - a for r in done for a, b in zip(r["stamps"], r["stamps"][1:]) if a < t1 and b > t0]
    return {"prompt_tokens": prompt_tokens, "streams": streams, "long_prompt_ttft_s": round(t1 - t0, 3),
            "itl_samples": len(itl), "itl_p50_s": _pct(itl, 0.5), "itl_p99_s": _pct(itl, 0.99),
            "itl_max_s": max(itl) if itl else None}


def _engine_seconds(url: str) -> dict:
    """{"step": s, "forward": s} from the server's /metrics (engine thread time so far)."""
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("fusesteer_engine_seconds_total{"):
            part = line.split('part="', 1)[1].split('"', 1)[0]
            out[part] = float(line.rsplit(" ", 1)[1])
    return out


def _write_plans(model_name: str, n: int, folder: str) -> dict:
    import fusesteer as fs

    from .common import per_row_plans

    model, _ = fs.models.load(model_name, progress=False)
    plans = per_row_plans(model, n)
    for name, p in plans.items():
        p.save(os.path.join(folder, f"{name}.safetensors"))
    first = plans["row0"]
    return {"plans": n, "entries_per_plan": len(first.entries), "sites": sorted({e.site for e in first.entries}),
            "layers": len({e.layer for e in first.entries})}


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = res["pooled"]
    cs = sorted({a["clients"] for a in arms})
    get = {(a["clients"], a["arm"]): a for a in arms}
    # every arm: this server's two, then the --versus server's ("steered [FLAGS]"), then the peer's (any other name)
    names = sorted({a["arm"] for a in arms},
                   key=lambda n: (not n.startswith(("unsteered", "steered")), "[" in n, n.startswith("steered"), n))
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.6))
    w = 0.8 / len(names)
    for j, arm in enumerate(names):
        ax[0].bar([i + (j - (len(names) - 1) / 2) * w for i in range(len(cs))],
                  [get[(c, arm)]["tokens_per_s"] if (c, arm) in get else 0 for c in cs], w, label=arm,
                  color=colors[arm])
    seq = res.get("sequential")
    if seq:
        ax[0].axhline(seq["tokens_per_s"], color="k", ls="--", lw=1,
                      label=f"one request at a time ({seq['clients']} clients)")
    ax[0].set_xticks(range(len(cs)), [str(c) for c in cs])
    ax[0].set_xlabel("concurrent clients")
    ax[0].set_ylabel("aggregate tokens/s")
    ax[0].set_title("throughput (steered: one plan per client)")
    ax[0].legend(fontsize=7)
    for k, (metric, title) in enumerate((("ttft", "time to first token"), ("itl", "inter-token latency"))):
        for arm in names:
            for q, ls in (("p50", "-"), ("p99", ":")):
                xs = [c for c in cs if (c, arm) in get]
                ys = [1000 * (get[(c, arm)][f"{metric}_{q}_s"] or 0) for c in xs]
                ax[k + 1].plot(xs, ys, ls, marker="os"[q == "p99"], color=colors[arm],
                               label=f"{arm} {q}" if q == "p50" else None)
        ax[k + 1].set_xscale("log", base=2)
        ax[k + 1].set_xticks(cs, [str(c) for c in cs])
        ax[k + 1].set_xlabel("concurrent clients")
        ax[k + 1].set_ylabel("ms")
        ax[k + 1].set_title(f"{title} (p50 solid, p99 dotted)")
        ax[k + 1].legend(fontsize=7)
    fig.suptitle(f"fusesteer serve, {res['model']}, {res['machine']['cpu_model']} ({res['machine']['device']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _command(args) -> str:
    """The command line that reproduces ``args`` (every option, before ``--quick`` rewrites them)."""
    parts = ["fusesteer bench serve", "--model", args.model, "--clients", *map(str, args.clients),
             "--requests", str(args.requests), "--rounds", str(args.rounds), "--max-tokens", str(args.max_tokens),
             "--arm-time-cap", str(args.arm_time_cap), "--sequential-clients", str(args.sequential_clients),
             "--backend", args.backend]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    if args.serve_args:
        parts += ["--serve-args", repr(args.serve_args)]
    if args.versus:
        parts += ["--versus", repr(args.versus)]
    if args.peer != "none":
        parts += ["--peer", args.peer]
    if args.long_prompt:
        parts += ["--long-prompt", str(args.long_prompt)]
    if args.no_sequential:
        parts.append("--no-sequential")
    if args.out is not None:
        parts += ["--out", str(args.out)]
    if args.quick:
        parts.append("--quick")
    return " ".join(parts)


def cli(args) -> int:
    """`fusesteer bench serve ...` (``args`` parsed with :func:`fusesteer.bench.options.add_serve_arguments`)."""
    command = _command(args)
    if args.quick:
        args.clients, args.requests, args.max_tokens, args.sequential_clients, args.rounds = [1, 2], 1, 8, 2, 1
    if min(args.clients) < 1 or args.requests < 1 or not 1 <= args.max_tokens <= 4096:
        raise BenchError("--clients and --requests must be >= 1 and --max-tokens in 1..4096")
    out = resolve_out(args.out, "serve")
    import torch

    from .common import machine_info

    n_plans = max(max(args.clients), args.sequential_clients)
    res: dict = {"model": args.model, "command": command,
                 "max_tokens": args.max_tokens, "requests_per_client": args.requests, "arms": []}
    with tempfile.TemporaryDirectory(prefix="fusesteer-bench-serve-") as plans_dir:
        res["plan"] = _write_plans(args.model, n_plans, plans_dir)
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        res["machine"] = machine_info(dev)
        extra = args.serve_args.split() if args.serve_args else []
        cap = max(args.max_tokens, LONG_STREAM_TOKENS) if args.long_prompt else args.max_tokens
        rows = max(max(args.clients), LONG_STREAMS + 1 if args.long_prompt else 1)
        srv = ServerProc(args.model, plans_dir, rows, cap, args.backend, args.threads, out / "server.log", extra)
        servers = {"": srv}
        peer = None
        try:
            srv.wait_ready()
            res["server_command"] = " ".join(srv.cmd)
            if args.versus:
                vs = servers[versus_label(args)] = ServerProc(args.model, plans_dir, rows, cap, args.backend,
                                                              args.threads, out / "server-versus.log",
                                                              extra + args.versus.split())
                vs.wait_ready(timeout=1800.0)  # --compile warms up every decode bucket first
                res["versus_command"] = " ".join(vs.cmd)
            if args.peer != "none":
                from ..models import cache_path

                model_dir = str(Path(args.model) if Path(args.model).exists() else cache_path(args.model))
                peer = PeerProc(model_dir, args.threads, out / "peer.log", compile=args.peer.endswith("compile"))
                peer.wait_ready()
                res["peer_command"] = " ".join(peer.cmd)
                asyncio.run(_arm(peer.url, peer.model_id, 2, 1, 4, False, 60, None, name="peer"))  # warm-up
            for s in servers.values():
                asyncio.run(_arm(s.url, args.model, 2, 1, 4, True, 60, None))  # warm-up
            order = random.Random(0)
            for c in args.clients:
                for rnd in range(args.rounds):
                    arms = [(label, steered) for label in servers for steered in (False, True)]
                    arms += [("peer", False)] if peer else []
                    order.shuffle(arms)  # paired rounds in random order: machine drift hits all arms alike
                    for label, steered in arms:
                        if label == "peer":
                            a = asyncio.run(_arm(peer.url, peer.model_id, c, args.requests, args.max_tokens, False,
                                                 args.arm_time_cap, None, name=args.peer))
                        else:
                            s = servers[label]
                            e0 = _engine_seconds(s.url)
                            a = asyncio.run(_arm(s.url, args.model, c, args.requests, args.max_tokens, steered,
                                                 args.arm_time_cap, None, stop_at_eos=peer is not None))
                            e1 = _engine_seconds(s.url)
                            step, fwd = e1["step"] - e0["step"], e1["forward"] - e0["forward"]
                            a["engine_busy_share"] = round(step / a["wall_s"], 3)  # engine thread busy / wall
                            a["forward_share_of_step"] = round(fwd / step, 3) if step else None
                            a["arm"] += label
                        a["round"] = rnd
                        a["load_average_1m"] = os.getloadavg()[0]
                        res["arms"].append(a)
                        print(json.dumps({k: v for k, v in a.items() if not k.startswith("_")}), flush=True)
            res["first_use_of_a_new_steering"] = asyncio.run(_first_use(srv.url, args.model))
            print(json.dumps(res["first_use_of_a_new_steering"]), flush=True)
            if args.long_prompt:
                res["long_prompt"] = asyncio.run(_long_prompt_itl(srv.url, args.model, args.long_prompt))
                print(json.dumps(res["long_prompt"]), flush=True)
            res["server_metrics"] = _server_gauges(srv.url)
            if args.versus:
                res["versus_server_metrics"] = _server_gauges(servers[versus_label(args)].url)
        finally:
            for s in servers.values():
                s.stop()
            if peer is not None:
                peer.stop()
    if args.no_sequential:
        return _finish(res, args, out)
    with tempfile.TemporaryDirectory(prefix="fusesteer-bench-serve-") as plans_dir:
        _write_plans(args.model, n_plans, plans_dir)
        seq_srv = ServerProc(args.model, plans_dir, 1, args.max_tokens, args.backend, args.threads,
                             out / "server-sequential.log", args.serve_args.split() if args.serve_args else [])
        try:
            seq_srv.wait_ready()
            asyncio.run(_arm(seq_srv.url, args.model, 1, 1, 4, True, 60, None))
            s = asyncio.run(_arm(seq_srv.url, args.model, args.sequential_clients, args.requests, args.max_tokens,
                                 True, args.arm_time_cap, None))
            s["arm"] = "steered, --max-batch 1"
            res["sequential"] = s
            print(json.dumps({k: v for k, v in s.items() if not k.startswith("_")}), flush=True)
        finally:
            seq_srv.stop()
    return _finish(res, args, out)


def versus_label(args) -> str:
    """The suffix of the ``--versus`` server's arm names: ``unsteered [--compile]``."""
    return f" [{args.versus.strip()}]"


def _server_gauges(url: str) -> dict:
    """The engine's fixed-shape facts from /metrics: recompiles after warm-up, KV bytes, prefix hit rate."""
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        for g in ("compile_recompiles", "kv_cache_bytes", "prefix_cache_hit_rate"):
            if line.startswith(f"fusesteer_{g} "):
                out[g] = float(line.rsplit(" ", 1)[1])
    return out


def _ratios(arms: list[dict], clients: int, num: str, den: str) -> dict:
    """tokens/s of arm ``num`` / arm ``den`` at ``clients``: pooled over the rounds, and per paired round."""
    by_round: dict = {}
    for a in arms:
        if a["clients"] == clients:
            by_round.setdefault(a["round"], {})[a["arm"]] = (a["tokens"], a["wall_s"])
    pairs = [(r[num], r[den]) for r in by_round.values() if num in r and den in r]
    rounds = [(n[0] / n[1]) / (d[0] / d[1]) for n, d in pairs]
    pooled = (sum(n[0] for n, _ in pairs) / sum(n[1] for n, _ in pairs)) / \
        (sum(d[0] for _, d in pairs) / sum(d[1] for _, d in pairs))
    return {"pooled": round(pooled, 3), "median_of_rounds": round(statistics.median(rounds), 3),
            "rounds": [round(x, 3) for x in rounds]}


def _finish(res: dict, args, out: Path) -> int:
    res["pooled"] = _pool(res["arms"])
    get = {(a["clients"], a["arm"]): a for a in res["pooled"]}
    ratios = {str(c): _ratios(res["arms"], c, "steered", "unsteered") for c in args.clients}
    res["summary"] = {"tokens_per_s_ratio_steered_vs_unsteered": ratios, "speedup_vs_one_at_a_time": None}
    if args.peer != "none":
        ours = ("unsteered", "steered") + ((f"unsteered{versus_label(args)}", f"steered{versus_label(args)}")
                                           if args.versus else ())
        res["summary"]["tokens_per_s_vs_peer"] = {
            str(c): {arm: _ratios(res["arms"], c, arm, args.peer) for arm in ours}
            | {"tokens_per_request": {arm: get[(c, arm)]["tokens_per_request"]
                                      for arm in ("unsteered", "steered", args.peer)}}
            for c in args.clients}
    if args.versus:
        lab = versus_label(args)
        res["summary"]["tokens_per_s_versus"] = {
            str(c): {arm: _ratios(res["arms"], c, arm + lab, arm) for arm in ("unsteered", "steered")}
            | {"steered / unsteered" + lab: _ratios(res["arms"], c, "steered" + lab, "unsteered" + lab)}
            for c in args.clients}
    sc = args.sequential_clients
    if (sc, "steered") in get and res.get("sequential"):
        res["summary"]["speedup_vs_one_at_a_time"] = {
            "clients": sc, "value": round(get[(sc, "steered")]["tokens_per_s"] / res["sequential"]["tokens_per_s"], 2)}
    res["targets"] = {"ratio_at_8": ">= 0.95", "speedup_at_8": ">= 3x"}
    for a in res["arms"] + ([res["sequential"]] if res.get("sequential") else []):
        a.pop("_ttft", None)
        a.pop("_itl", None)
    (out / "serve.json").write_text(json.dumps(res, indent=1))
    why = plots_unavailable()
    if not why:
        _plot(res, out / "serve.png")
    print(json.dumps(res["summary"], indent=1))
    print(f"wrote {out / 'serve.json'}" + (f"; no serve.png: {why}" if why else f" and {out / 'serve.png'}"))
    return 0
