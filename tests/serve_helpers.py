"""What the server tests share: a request's answer when it runs by itself, and waiting for a served process."""

from __future__ import annotations

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
