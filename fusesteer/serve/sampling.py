"""Per-row sampling for a batch: every row has its own sampling parameters, and a row that cannot be sampled
fails alone.

Order, per row (as in vLLM): ``logit_bias`` is added, end-of-sequence ids are masked while fewer than
``min_tokens`` tokens were generated, ``repetition_penalty`` (HF's: positive logits divided, negative ones
multiplied, over every token of the prompt and of the completion), then ``frequency_penalty`` (times the
count) and ``presence_penalty`` (once) over the completion's tokens; then greedy (``temperature`` 0) takes the
argmax, else ``top_k`` and ``top_p`` cut, and one token is drawn with the row's own seeded generator.
Each step is one tensor operation over the rows that use it; rows that use none of them take the plain argmax
of their logits, exactly as before these existed.

Temperatures are applied in float64 after subtracting the row's maximum, so any temperature in (0, 2]
(down to the smallest denormal) is well defined: a tiny one is the limit, greedy over the tied maxima.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """A request's sampling parameters (validated by the HTTP layer; the defaults change nothing)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple = ()  # ((token id, bias), ...)

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class SamplingFailed(RuntimeError):
    """This row's logits cannot be sampled (answered with 400 for that request only)."""


class RowSampler:
    """One row's parameters and state: its generator (seeded), the tokens it has seen (for the penalties)."""

    def __init__(self, params: Sampling, prompt_ids: list[int], eos_ids: frozenset):
        self.p = params
        self.prompt_ids = prompt_ids
        self.eos = sorted(eos_ids) if params.min_tokens > 0 else []
        self.n = 0  # tokens generated so far
        self.gen = None
        if params.temperature > 0:
            self.gen = torch.Generator(device="cpu")
            self.gen.manual_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little"))
        self.seen = self.counts = None  # [V] bool (prompt + completion), [V] float (completion counts)

    @property
    def plain(self) -> bool:
        """Nothing to do before the argmax / the draw."""
        p = self.p
        return not p.logit_bias and not p.penalised and not (self.eos and self.n < p.min_tokens)

    def _state(self, vocab: int, device) -> None:
        if self.seen is None:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids = torch.tensor([t for t in self.prompt_ids if 0 <= t < vocab], dtype=torch.long, device=device)
            self.seen[ids] = True
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)

    def observe(self, token: int) -> None:
        """Record the row's new token."""
        self.n += 1
        if self.seen is not None and 0 <= token < self.seen.numel():
            self.seen[token] = True
            self.counts[token] += 1


def _process(logits: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
    """Bias, min_tokens and penalties, each applied to the rows that ask for it (a new tensor)."""
    x = logits.clone()
    vocab, dev = x.shape[1], x.device
    bias = [(i, t, b) for i, r in enumerate(rows) for t, b in r.p.logit_bias if t < vocab]
    if bias:
        i, t, b = zip(*bias)
        x.index_put_((torch.tensor(i, device=dev), torch.tensor(t, device=dev)),
                     torch.tensor(b, dtype=x.dtype, device=dev), accumulate=True)
    mask = [(i, t) for i, r in enumerate(rows) if r.n < r.p.min_tokens for t in r.eos if t < vocab]
    if mask:
        i, t = zip(*mask)
        x[torch.tensor(i, device=dev), torch.tensor(t, device=dev)] = float("-inf")
    pen = [i for i, r in enumerate(rows) if r.p.penalised]
    if pen:
        for i in pen:
            rows[i]._state(vocab, dev)
        idx = torch.tensor(pen, device=dev)
        sub = x.index_select(0, idx)
        col = lambda name: torch.tensor([getattr(rows[i].p, name) for i in pen], dtype=x.dtype, device=dev)[:, None]
        rep, pres, freq = col("repetition_penalty"), col("presence_penalty"), col("frequency_penalty")
        seen = torch.stack([rows[i].seen for i in pen])
        counts = torch.stack([rows[i].counts for i in pen])
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub = sub - freq * counts - pres * (counts > 0).to(sub.dtype)
        x.index_copy_(0, idx, sub)
    return x


def _draw(x: torch.Tensor, rows: list[RowSampler]) -> list[int]:
    """Temperature, top_k, top_p and one draw per row with the row's generator (rows all have temperature > 0)."""
    dev = x.device
    s = x.double()
    s = s - s.max(dim=-1, keepdim=True).values
    s = s / torch.tensor([r.p.temperature for r in rows], dtype=s.dtype, device=dev)[:, None]
    vocab = s.shape[1]
    cut = any(0 < r.p.top_k < vocab or r.p.top_p < 1.0 for r in rows)
    if cut:
        s, order = torch.sort(s, dim=-1, descending=True, stable=True)
        k = torch.tensor([r.p.top_k if 0 < r.p.top_k < vocab else vocab for r in rows], device=dev)[:, None]
        s = s.masked_fill(torch.arange(vocab, device=dev)[None, :] >= k, float("-inf"))
    probs = torch.softmax(s, dim=-1)
    if cut:
        top_p = torch.tensor([r.p.top_p for r in rows], dtype=probs.dtype, device=dev)[:, None]
        probs = probs.masked_fill((torch.cumsum(probs, dim=-1) - probs) > top_p, 0.0)
    ok = (torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)).tolist()
    out = []
    for i, r in enumerate(rows):
        if not ok[i]:
            raise SamplingFailed(f"row {i}: no token has a finite, positive probability after the sampling "
                                 "parameters were applied")
        j = int(torch.multinomial(probs[i].cpu(), 1, generator=r.gen))
        out.append(int(order[i, j]) if cut else j)
    return out


def _sample_all(logits: torch.Tensor, rows: list[RowSampler]) -> list[int]:
    plain = all(r.plain for r in rows)
    x = logits if plain else _process(logits, rows)
    out = torch.argmax(x, dim=-1).tolist()
    greedy = [i for i, r in enumerate(rows) if r.p.temperature <= 0]
    if greedy and not plain:  # finite logits stay finite unless processed
        best = x[greedy].max(dim=-1).values
        if not bool(torch.isfinite(best).all()) or bool(torch.isnan(x[greedy]).any()):
            raise SamplingFailed("the largest logit is not finite after the sampling parameters were applied")
    drawn = [i for i, r in enumerate(rows) if r.p.temperature > 0]
    if drawn:
        for i, tok in zip(drawn, _draw(x[drawn], [rows[i] for i in drawn])):
            out[i] = tok
    return out


def sample(logits: torch.Tensor, rows: list[RowSampler]) -> list[int | Exception]:
    """One token per row (``logits`` [rows, vocab], finite), or the exception that row's sampling raised. The
    whole batch is sampled at once; if that raises, each row is sampled alone so that only the rows that
    cannot be sampled fail. Tokens are recorded with ``RowSampler.observe``."""
    if not rows:
        return []
    try:
        out: list = _sample_all(logits, rows)
    except Exception:  # noqa: BLE001 - find the rows at fault
        out = []
        for i, r in enumerate(rows):
            try:
                out.append(_sample_all(logits[i:i + 1], [r])[0])
            except Exception as e:  # noqa: BLE001 - this row fails alone
                out.append(e)
    for r, tok in zip(rows, out):
        if isinstance(tok, int):
            r.observe(tok)
    return out
