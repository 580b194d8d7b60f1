"""What the engine knows of one generation: the request, where it stands (:class:`Status`), and its batch row."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .registry import Steering
from .sampling import RowSampler, Sampling

_ids = itertools.count(1)


class Status(enum.Enum):
    """Where a request stands. Only the engine moves it (``cancel()`` from any thread only asks)."""

    NEW = "new"  # built, not submitted
    QUEUED = "queued"  # waiting for a batch row
    ADMITTED = "admitted"  # taken from the queue this step: its prompt is being prefilled
    RUNNING = "running"  # holds a batch row
    FINISHED = "finished"  # finished, cancelled or failed: its last event was sent


@dataclass(eq=False)
class GenRequest:
    """One generation. ``sink`` receives events from the engine thread:
    ("token", id), ("finish", reason), ("error", http_status, message, code)."""

    prompt_ids: list[int]
    max_tokens: int
    sink: Callable[[tuple], None]
    steering: Steering = field(default_factory=Steering)
    sampling: Sampling = field(default_factory=Sampling)
    eos_ids: frozenset = frozenset()
    plan: object = None  # the steering's effective plan, when the caller composed it already (off the engine thread)
    endpoint: str = "completions"  # the metrics label of the API that asked
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    # engine-owned
    status: Status = Status.NEW
    generated: list = field(default_factory=list)
    t_arrival: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_last: float | None = None
    finish_reason: str | None = None
    cancel_reason: str | None = None  # set by cancel(): the finish reason to report

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop generating (client gone: "cancelled"; a stop string was seen: "stop"). Any thread."""
        self.cancel_reason = reason

    @property
    def cancelled(self) -> bool:
        return self.cancel_reason is not None

    @property
    def done(self) -> bool:
        return self.status is Status.FINISHED


@dataclass(eq=False)
class Row:
    """A request holding a batch row: one KV slot, filled by chunked prefill, then decoding."""

    req: GenRequest
    key: str | None  # effective plan key (None = unsteered)
    prompt_len: int
    n_cached: int  # tokens in this row's KV slot (prompt chunks so far, then prompt + generated)
    pending: int  # sampled token not yet fed to the model (-1 while prefilling)
    sampler: RowSampler
    slot: int = -1  # its KV slot
    prefix_key: str | None = None  # what steers its prompt tokens (prefix cache key; None = unsteered prompt)
    prefix_counted: bool = False  # its prompt's prefix-cache hit / miss tokens are counted (at its first chunk)

    @property
    def prefilling(self) -> bool:
        return self.n_cached < self.prompt_len
