"""What the server tests share: a request's answer when it runs by itself, and `fusesteer serve` as a process
(started on a free loopback port with this checkout importable, waited for, stopped with its descendants)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

import fusesteer as fs


def greedy_alone(model, ids, plan, n: int, pad_id: int = 0, exact: bool = False, backend: str = "torch") -> list[int]:
    """The ``n`` greedy tokens after ``ids`` with ``plan`` (or None) attached by itself (fs.attach, ``backend``)
    on ``model``; ``exact``: exactly ``n`` tokens (no stop at EOS)."""
    x = torch.tensor([list(ids)])
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, temperature=None, top_p=None,
              top_k=None, pad_token_id=pad_id, **({"min_new_tokens": n} if exact else {}))
    with torch.no_grad():
        if plan is None:
            out = model.generate(x, **kw)
        else:
            with fs.attach(model, plan, backend=backend):
                out = model.generate(x, **kw)
    return out[0, x.shape[1]:].tolist()


def wait_healthy(proc, url: str, log_path, limit: float) -> None:
    """Wait until the server process ``proc`` answers ``/health`` with 200; fail with its log if it exits, or after
    ``limit`` seconds."""
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            pytest.fail(f"fusesteer serve exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() - t0 < limit, "fusesteer serve did not start"
        time.sleep(0.25)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkout_env(**extra) -> dict:
    """This environment with the checkout importable (a child process imports this very fusesteer), plus ``extra``."""
    path = os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH")] if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def serve_process(args: list[str], log_path, port: int | None = None, **env) -> tuple[subprocess.Popen, str]:
    """Start ``python -m fusesteer serve ARGS --port PORT`` (a free port by default) with its output in
    ``log_path`` (a file, not a pipe: a full pipe would stall the server); returns (process, url)."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "fusesteer", "serve", *map(str, args), "--port", str(port)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=checkout_env(**env))
    return proc, f"http://127.0.0.1:{port}"


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (torchrun's ranks below the launcher)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def stop_process(proc: subprocess.Popen, first: int = signal.SIGTERM, grace: float = 30.0) -> None:
    """Stop ``proc`` with ``first``; after ``grace`` seconds SIGKILL it and every process below it."""
    if proc.poll() is not None:
        return
    below = descendants(proc.pid)
    proc.send_signal(first)
    try:
        proc.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        pass
    for pid in descendants(proc.pid) + below:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    proc.kill()
    proc.wait()
