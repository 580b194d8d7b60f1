"""Serving on N processes under transformers' tensor parallelism: rank 0 serves HTTP and schedules, the other
ranks run the same forwards.

Every rank holds its shard of the model (``from_pretrained(..., tp_plan="auto")``), its own steering runtime
(the plan table holds each rank's slice of the sharded sites) and its own KV cache (its attention heads). Only
rank 0 runs the engine: it decides, every step, what the model does, and before doing it sends the other ranks
the same call on a control channel (:class:`Channel`), so every rank runs the same forward in the same order:

- ``steerer``: build the steering runtime (``fs.attach`` with the plan table; its contract probe runs a
  forward);
- ``add`` (a plan key and the plan, as plan-file bytes read back by the bounded loader: never pickle) and
  ``remove``: plan-table writes, between two forwards; after an ``add`` the ranks check that they all
  succeeded or all failed (a rank that disagrees stops the server);
- ``start``: the KV cache's shape, the decode buckets and the compile options; every rank then checks the
  cache contract and warms up the same decode steps;
- ``prefill`` (each row's slot, tokens, positions, plan key, prompt length) and ``decode`` (each slot's token,
  position, plan key, prompt length): one forward; the logits are the same on every rank, and only rank 0
  samples;
- ``copy`` / ``zero``: KV-slot surgery (prefix reuse, compaction, a row that went non-finite);
- ``ping`` when idle, and ``stop``.

The channel is a gloo process group of its own (the model's collectives run on the default group: gloo on CPU,
NCCL on GPUs) with a timeout. A command is JSON bytes in a uint8 tensor (``dist.broadcast``); a plan is its
file bytes (:func:`fusesteer.runtime.tp.broadcast_plan`). A rank that dies or raises ends its process with exit
code 1 and one log line; the others see the closed connection (or, for a rank that stops answering, the
timeout) at their next collective and stop the same way; the engine fails every open request with 503 first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from datetime import timedelta

import torch

from ..errors import FuseSteerError
from .forward import Chunk, CompileOptions, Forwards
from .steer import Steerer

log = logging.getLogger("fusesteer.serve")

PING_INTERVAL = 1.0  # seconds between rank 0's pings when idle (a rank that died is seen within about this)
DEFAULT_TIMEOUT = 120.0  # seconds a collective waits for a rank that stopped answering


class RankFailure(RuntimeError):
    """Another rank died, raised or stopped answering: the server cannot run a forward any more."""


# ---- process group -------------------------------------------------------------------------------------
def world_from_env() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init(timeout: float = DEFAULT_TIMEOUT) -> Channel:
    """Join torchrun's process group (NCCL with CUDA, gloo otherwise) and open the control channel."""
    import torch.distributed as dist

    if not dist.is_available():
        raise FuseSteerError("serving on several processes needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout))
    return Channel(timeout)


def spawn_argv(argv: list[str], nproc: int) -> list[str]:
    """The torchrun command line that runs ``fusesteer serve ARGV`` (without ``--tp``) on ``nproc`` processes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(port), "--monitor-interval", "0.5", "-m", "fusesteer", "serve", *argv]


class Channel:
    """Rank 0 to every other rank: one command at a time, on a gloo group of its own."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT):
        import torch.distributed as dist

        self.dist = dist
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.last = time.monotonic()
        self.broken: BaseException | None = None

    def _guard(self, call):
        """``call()``; a failure of the transport (gloo: a peer's connection closed, or the timeout passed)
        breaks the channel for good and becomes RankFailure. A FuseSteerError (a bad plan) passes through."""
        try:
            return call()
        except FuseSteerError:
            raise
        except Exception as e:
            self.broken = e
            raise RankFailure(f"a tensor-parallel rank is gone ({type(e).__name__}: {e})") from e

    def _collective(self, fn, *args, **kw):
        return self._guard(lambda: fn(*args, group=self.group, **kw))

    def send(self, op: str, plan=None, **args) -> None:
        """Rank 0: the other ranks will run ``op`` (``plan``: a SteeringPlan sent with it)."""
        if self.broken is not None:
            raise RankFailure(f"the control channel failed earlier: {self.broken}")
        data = json.dumps({"op": op, **args}).encode()
        head = torch.tensor([len(data), int(plan is not None)], dtype=torch.int64)
        self._collective(self.dist.broadcast, head, 0)
        self._collective(self.dist.broadcast, torch.frombuffer(bytearray(data), dtype=torch.uint8), 0)
        if plan is not None:
            self._plan(plan)
        self.last = time.monotonic()

    def recv(self) -> tuple[dict, object]:
        """Another rank: the next command (a dict with ``op``) and the plan sent with it (or None)."""
        head = torch.zeros(2, dtype=torch.int64)
        self._collective(self.dist.broadcast, head, 0)
        data = torch.empty(int(head[0]), dtype=torch.uint8)
        self._collective(self.dist.broadcast, data, 0)
        cmd = json.loads(bytes(data.numpy()).decode())
        return cmd, (self._plan(None) if int(head[1]) else None)

    def _plan(self, plan):
        from ..runtime.tp import broadcast_plan

        return self._guard(lambda: broadcast_plan(plan, 0, group=self.group))

    def agree(self, ok: bool, what: str) -> None:
        """Every rank says whether ``what`` worked; they must all agree (else RankFailure on every rank)."""
        t = torch.tensor([int(ok), -int(ok)], dtype=torch.int64)
        self._collective(self.dist.all_reduce, t, op=self.dist.ReduceOp.MAX)
        if int(t[0]) != -int(t[1]):
            raise RankFailure(f"the ranks disagree about {what}: it worked on some and failed on others")

    def ping(self) -> None:
        if time.monotonic() - self.last >= PING_INTERVAL:
            self.send("ping")


def add_on_every_rank(channel: Channel, steerer: Steerer, key, plan) -> None:
    """Add a plan to this rank's table, then check that every rank did the same: all added it, or all refused it
    (the refusal is raised here, on every rank); ranks that disagree raise RankFailure."""
    err = None
    try:
        Steerer._add(steerer, key, plan)
    except FuseSteerError as e:
        err = e
    channel.agree(err is None, f"adding plan {key!r}")
    if err is not None:
        raise err


# ---- rank 0: the runtime objects that send each call before making it ----------------------------------
class LeaderSteerer(Steerer):
    def __init__(self, model, channel: Channel, backend: str = "auto", capacity: int = 16):
        self.channel = channel
        channel.send("steerer", backend=backend, capacity=int(capacity))
        super().__init__(model, backend=backend, capacity=capacity)

    def _add(self, key, plan) -> None:
        self.channel.send("add", plan=plan, key=key)
        add_on_every_rank(self.channel, self, key, plan)

    def _remove(self, key) -> None:
        self.channel.send("remove", key=key)
        super()._remove(key)

    def close(self) -> None:
        if self.handle is not None and self.channel.broken is None:
            try:
                self.channel.send("stop")
            except RankFailure as e:
                log.warning("could not tell the other ranks to stop: %s", e)
        super().close()


class LeaderForwards(Forwards):
    def __init__(self, *args, channel: Channel, **kw):
        super().__init__(*args, **kw)
        self.channel = channel

    def start(self) -> None:
        c = self.copts
        self.channel.send("start", rows=self.rows, max_len=self.max_len, buckets=list(self.buckets),
                          kv_step=self.kv_step, compile=dataclasses.asdict(c))
        super().start()

    def decode(self, by_slot: list):
        self.channel.send("decode", by_slot=by_slot)
        return super().decode(by_slot)

    def prefill(self, chunks: list[Chunk]):
        self.channel.send("prefill", chunks=[dataclasses.asdict(c) for c in chunks])
        return super().prefill(chunks)

    def copy(self, src: int, dst: int, n: int) -> None:
        self.channel.send("copy", src=src, dst=dst, n=n)
        super().copy(src, dst, n)

    def zero(self, slot: int, n: int | None = None) -> None:
        self.channel.send("zero", slot=slot, n=n)
        super().zero(slot, n)

    def tick(self) -> None:
        self.channel.ping()


# ---- the other ranks ----------------------------------------------------------------------------------
def follow(model, channel: Channel) -> int:
    """Run rank 0's commands until it says stop (returns 0) or a rank fails (logs one line, returns 1)."""
    rank = channel.rank
    steerer: Steerer | None = None
    fw: Forwards | None = None
    try:
        with torch.inference_mode():
            while True:
                cmd, plan = channel.recv()
                op = cmd["op"]
                if op == "ping":
                    continue
                if op == "steerer":
                    steerer = Steerer(model, backend=cmd["backend"], capacity=cmd["capacity"])
                elif op == "add":
                    try:
                        add_on_every_rank(channel, steerer, cmd["key"], plan)
                    except FuseSteerError:  # rank 0 refuses it to its client
                        pass
                elif op == "remove":
                    steerer._remove(cmd["key"])
                elif op == "start":
                    fw = Forwards(model, steerer, cmd["rows"], cmd["max_len"], buckets=cmd["buckets"],
                                  compile=CompileOptions(**cmd["compile"]), kv_step=cmd["kv_step"])
                    fw.start()
                elif op == "decode":
                    fw.decode(cmd["by_slot"])
                elif op == "prefill":
                    fw.prefill([Chunk(**c) for c in cmd["chunks"]])
                elif op == "copy":
                    fw.copy(cmd["src"], cmd["dst"], cmd["n"])
                elif op == "zero":
                    fw.zero(cmd["slot"], cmd["n"])
                elif op == "stop":
                    log.info("rank %d: rank 0 stopped serving", rank)
                    if steerer is not None:
                        steerer.close()
                    return 0
                else:
                    raise RankFailure(f"unknown command {op!r} from rank 0")
    except RankFailure as e:
        log.critical("rank %d: stopping (exit code 1): %s", rank, e)
        return 1
    except Exception as e:  # noqa: BLE001 - one line, then the process ends and the other ranks see it
        log.critical("rank %d: stopping (exit code 1): %s: %s", rank, type(e).__name__, e, exc_info=True)
        return 1
