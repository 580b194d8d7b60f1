"""The admission policy, as pure functions of numbers: which waiting requests start this step, whether one more
may wait, and how long a refused client should wait. No model, no threads, no clock (see tests/test_scheduler.py).

:func:`admit` walks the queue in arrival order (FIFO) and takes requests while

- a batch row is free (``running + taken < max_batch``);
- the prefill forward stays under ``max_prefill_tokens``: it pads every admitted prompt to the longest one, so
  ``taken * longest`` must fit (the first request always goes, however long: it runs alone). The first request
  that does not fit ends the walk, so a short prompt never overtakes a long one that waits for room;
- its plan can have a slot in the plan table (back-pressure): a steered request whose plan no running or
  admitted request uses needs a slot of its own; when ``plan_slots`` distinct plans are in use already it stays
  queued, keeping its place, and takes neither a row nor prefill tokens. Later requests whose plans are in use
  (or that are unsteered) may still start.

Cancelled requests met on the walk are dropped from the queue.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Waiting:
    """What admission reads of a queued request."""

    prompt_len: int
    plan: str | None = None  # effective plan key; None = unsteered
    cancelled: bool = False


@dataclass(frozen=True)
class Limits:
    max_batch: int  # rows decoded together
    max_prefill_tokens: int  # padded tokens of one prefill forward
    plan_slots: int  # distinct plans the plan table holds at once


@dataclass(frozen=True)
class Admission:
    take: tuple[int, ...] = ()  # queue positions that start now, in queue order
    drop: tuple[int, ...] = ()  # queue positions of cancelled requests, to finish and remove
    deferred: tuple[int, ...] = ()  # queue positions passed over for want of a plan slot (they stay queued)


def admit(queue: Sequence[Waiting], running: int, plans_in_use: Collection[str], limits: Limits) -> Admission:
    """Which of ``queue`` start this step, with ``running`` rows busy whose plans are ``plans_in_use``."""
    take: list[int] = []
    drop: list[int] = []
    deferred: list[int] = []
    used = set(plans_in_use)
    longest = 0
    for i, w in enumerate(queue):
        if running + len(take) >= limits.max_batch:
            break
        if w.cancelled:
            drop.append(i)
            continue
        if w.plan is not None and w.plan not in used and len(used) >= limits.plan_slots:
            deferred.append(i)
            continue
        if take and (len(take) + 1) * max(longest, w.prompt_len) > limits.max_prefill_tokens:
            break
        longest = max(longest, w.prompt_len)
        take.append(i)
        if w.plan is not None:
            used.add(w.plan)
    return Admission(tuple(take), tuple(drop), tuple(deferred))


def queue_has_room(queued: int, busy_rows: int, max_batch: int, max_queue: int) -> bool:
    """Whether one more request may wait. A request that a free row takes at the next step does not wait:
    ``max_queue`` counts the others (so 0 means "refuse as soon as every row is busy")."""
    free = max(0, max_batch - busy_rows)
    return queued < max_queue + free


def retry_after(step_seconds: float) -> float:
    """Seconds a refused client is told to wait: a fixed guess of 16 decode steps at the recent mean step time
    (not an estimate of the running rows' remaining tokens), clamped to 1-60 s."""
    return max(1.0, min(60.0, step_seconds * 16))
