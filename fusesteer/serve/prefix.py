"""Prefix cache keyed by steering: a new row copies the KV of the longest prompt prefix it shares with a running
row or with a free slot that still holds a finished row's prompt, but only when the two prompts were steered
alike.

The key of a prompt's KV (:func:`prompt_key`) is what steers its prompt tokens: the effective plan's key (which
pins each plan's registry version and scale) when some entry acts on the prompt (gating ``all`` or
``prompt``), and None when no entry does (an unsteered request, or a plan gated to generated tokens only: its
prompt KV is the unsteered one, so they share). Two prompts with different keys never share KV.

Rows admitted together share too: the engine lets a row wait while another row of the same key prefills a
prefix they share (at least half of what the waiting row would compute), then copies it
(``Engine._waits`` / ``Engine._catch_up``).

At least one prompt token is always recomputed (its logits give the first generated token). A new row always
takes the lowest free slot (busy rows stay at the bottom, so the decode step runs at the smallest bucket); a
cached prefix that slot held moves to the highest free slot without one (:meth:`PrefixCache.move_out`), or is
dropped when no such slot is left.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["PrefixCache", "prompt_key"]


def prompt_key(key: str | None, plan) -> str | None:
    """What steers a request's prompt tokens (see the module doc); ``plan``: its effective plan, if known."""
    if key is None:
        return None
    if plan is None:
        return key  # unknown: never shared with another key
    return key if any(e.gating in ("all", "prompt") for e in plan.entries) else None


def common(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    def __init__(self, slots: int, min_tokens: int = 1):
        self.slots = slots
        self.min_tokens = max(1, int(min_tokens))
        self.entries: OrderedDict[int, tuple[list, str | None]] = OrderedDict()  # free slot -> (tokens, key)

    def clear(self) -> None:
        self.entries.clear()

    def offer(self, slot: int, tokens, key: str | None) -> None:
        """A row left ``slot``; its KV still holds ``tokens`` (prompt, steered by ``key``)."""
        if len(tokens) >= self.min_tokens:
            self.entries[slot] = (list(tokens), key)
            self.entries.move_to_end(slot)
        else:
            self.entries.pop(slot, None)

    def forget(self, slot: int) -> None:
        """``slot`` is about to be written by another row."""
        self.entries.pop(slot, None)

    def move_out(self, slot: int, free) -> tuple[int, int] | None:
        """``slot`` is about to be written by another row: where its cached prefix should move to be kept,
        ``(destination slot, tokens)`` (the highest slot of ``free`` without a cached prefix), or None (nothing
        cached there, or no room: the entry is dropped). The caller copies the KV before writing ``slot``."""
        entry = self.entries.pop(slot, None)
        if entry is None:
            return None
        room = [s for s in free if s != slot and s not in self.entries]
        if not room:
            return None
        self.entries[room[-1]] = entry
        return room[-1], len(entry[0])

    def lookup(self, prompt, key: str | None, live=()) -> tuple[int, int]:
        """(slot, tokens) of the longest reusable prefix of ``prompt`` among the cached slots and the ``live``
        sources ((slot, tokens, key) of running rows) with the same key; (-1, 0) if none."""
        best, m = -1, 0
        cap = len(prompt) - 1
        cands = [(s, t, k) for s, (t, k) in self.entries.items()] + list(live)
        for slot, toks, k in cands:
            if k != key:
                continue
            n = min(common(prompt, toks), cap)
            if n > m:
                best, m = slot, n
        if m < self.min_tokens:
            return -1, 0
        if best in self.entries:
            self.entries.move_to_end(best)
        return best, m
