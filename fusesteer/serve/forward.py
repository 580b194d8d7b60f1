"""The engine's model forwards over the preallocated KV slots (:mod:`.kv`): chunked prefill and the fixed-shape
decode step, eager or under ``torch.compile(fullgraph=True)``.

Compiled decode runs at a few bucketed batch sizes: the batch is slots ``[0, bucket)`` (the engine keeps busy rows
in the lowest slots), rows that are idle or still prefilling ride along writing to the scratch column,
unsteered. Eager decode runs over slots ``[0, padded)``, ``padded`` the smallest of :func:`padded_sizes` that holds
the highest busy slot (a multiple of 8 above 8 rows: faster GEMMs on CPU than the odd count itself). The
shapes of a decode forward are ``[bucket, 1]`` for ids, positions and write columns, and ``[bucket, 1, 1, n]``
for the mask, where ``n`` (columns attended: the longest row, rounded up to ``kv_step``) is the one dynamic
dimension (``torch._dynamo.mark_dynamic``), so a decode step compiles once per bucket; with
``mode="reduce-overhead"`` (CUDA graphs) each distinct ``n`` is one recording, not a recompile. Routing and
prompt lengths go through the runtime's persistent device tables (``handle.route`` / ``set_prompt_length``
write in place), so plans added, removed or rescaled, and rows changing phase, never change a compiled graph.

Prefill is eager: the chunks of several prompts in one left-padded forward (padding writes to scratch).
"""

from __future__ import annotations

import logging
import statistics
import time
import types
from dataclasses import dataclass

import torch

from ..runtime.compat import cache_keyword
from ..timing import paired_steps
from .kv import SlotCache, attention_mask, check_contract, decode_attention, layer_windows, mask_kind

log = logging.getLogger("fusesteer.serve")


def recompiles() -> int:
    """Graphs dynamo has compiled in this process (all compiled code): after the warm-up, each new one is a
    recompilation (a guard failed: a shape, a specialized value) or a graph break."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def default_buckets(rows: int) -> tuple[int, ...]:
    """Powers of two up to ``rows`` (and ``rows`` itself)."""
    out, b = [], 1
    while b < rows:
        out.append(b)
        b *= 2
    return tuple(out + [rows])


def padded_sizes(rows: int) -> tuple[int, ...]:
    """The batch sizes an eager decode step pads to: 1, 2, 4, 8, then steps of a quarter of the power of two below
    (8 up to 64, 16 up to 128, ...), and ``rows``. On CPU, GEMMs over a row count that is not a multiple of 4 or 8
    can be slower than over the next multiple (MKL, AMD EPYC, 2 threads: ``W @ x^T`` of a 1536 x 576 weight takes
    0.44 ms at 22 rows, 0.31 ms at 24), so a few padded rows cost less than an odd shape."""
    out, b = [], 1
    while b < min(rows, 8):
        out.append(b)
        b *= 2
    while b < rows:
        out.append(b)
        b += max(8, (1 << (b.bit_length() - 1)) // 4)
    return tuple(out + [rows])


TIMED_ROWS = (2, 4, 8, 16, 32)  # row counts at which transposed_linears times both forms (plus the decode sizes)


def transposed_linears(model, sizes=TIMED_ROWS, margin: float = 0.9):
    """CPU only: MKL multiplies ``[rows, in] x [out, in]^T`` (``F.linear``) at a few rows well below what the same
    products give as ``W @ x^T`` on some CPUs (AMD EPYC, 2 threads: SmolLM2-135M's 49152 x 576 LM head at 8 rows
    20.5 ms vs 7.9 ms; its 1536 x 576 MLP weights at 32 rows 0.47 vs 0.33 ms; at 8 rows the small ones go the other
    way, and at 22 rows ``W @ x^T`` is the slower form). For each distinct weight shape of the model's plain
    bias-free ``nn.Linear`` layers, both forms are timed (interleaved, :func:`fusesteer.timing.paired_steps`) at
    each row count in ``sizes``; a shape computes an input of exactly one of the counts where ``W @ x^T`` took less
    than ``margin`` of the time that way (every other input, e.g. a prefill's many rows, keeps ``F.linear``).
    Returns the undo, or None when nothing was changed (not on CPU, tensor-parallel shards, a module whose forward
    is already replaced, or no shape faster)."""
    from ..runtime.tp import is_dtensor

    mods = [m for m in model.modules() if type(m) is torch.nn.Linear and m.bias is None
            and m.weight.device.type == "cpu" and not is_dtensor(m.weight) and "forward" not in vars(m)]
    sizes = sorted({int(n) for n in sizes if int(n) >= 2})
    if not mods or not sizes:
        return None
    by_shape: dict = {}
    for m in mods:
        by_shape.setdefault((tuple(m.weight.shape), m.weight.dtype), []).append(m)
    chosen: dict = {}
    with torch.inference_mode():
        for key, ms in by_shape.items():
            w = ms[0].weight
            won = set()
            for n in sizes:
                x = torch.randn(n, w.shape[1], dtype=w.dtype)
                t = paired_steps({"plain": lambda: torch.nn.functional.linear(x, w), "flipped": lambda: w @ x.T},
                                 {"plain": None, "flipped": None}, cycles=6, warmup=2, baseline="plain")
                if statistics.median(t["flipped"].ratios) < margin:
                    won.add(n)
            if won:
                chosen[key] = frozenset(won)
    if not chosen:
        return None

    def flipped(won: frozenset):
        def forward(self, h):
            n = h.numel() // h.shape[-1]
            if self.bias is not None or n not in won:
                return torch.nn.functional.linear(h, self.weight, self.bias)
            return (self.weight @ h.reshape(n, h.shape[-1]).T).T.reshape(*h.shape[:-1], self.weight.shape[0])
        return forward

    patched = []
    for key, won in chosen.items():
        for m in by_shape[key]:
            m.forward = types.MethodType(flipped(won), m)
            patched.append(m)
    log.info("Linear layers as W @ x^T: %s", "; ".join(f"{k[0][0]}x{k[0][1]} at {sorted(won)} rows"
                                                      for k, won in chosen.items()))

    def undo() -> None:
        for m in patched:
            vars(m).pop("forward", None)
    return undo


@dataclass
class CompileOptions:
    enabled: bool = False
    backend: str = "inductor"  # "eager" (dynamo tracing only: tests), "inductor"
    mode: str | None = None  # None: "reduce-overhead" on CUDA, inductor's default elsewhere


@dataclass
class Chunk:
    """One row's part of a prefill forward: ``tokens`` at positions ``start..``, into slot ``slot``."""

    slot: int
    tokens: list
    start: int
    key: str | None
    prompt_len: int


class Forwards:
    def __init__(self, model, steerer, rows: int, max_len: int, buckets=None, compile: CompileOptions | None = None,
                 kv_step: int | None = None):
        self.model, self.steerer = model, steerer
        self.device = next(model.parameters()).device
        self.kind = mask_kind(model)
        self.windows = layer_windows(model)
        self.dtype = next(model.parameters()).dtype
        n_layers = int(model.config.num_hidden_layers)
        self.cache = SlotCache(rows, max_len, n_layers, self.device)
        self.rows, self.max_len = rows, max_len
        self.buckets = tuple(sorted({min(int(b), rows) for b in (buckets or default_buckets(rows))} | {rows}))
        self.padded = tuple(sorted(set(padded_sizes(rows)) | set(self.buckets)))  # eager decode sizes
        self.kv_step = int(kv_step or (256 if self.device.type == "cuda" else 32))
        self.copts = compile or CompileOptions()
        self.cache_kw = cache_keyword(model)  # read here: the compiled step must not trace inspect.signature
        self._decode = self._decode_eager
        self.compiled = False  # (a bound method is a new object at each access: compare this flag, not methods)
        self.recompiles_at_warmup: int | None = None
        self.warmup_s = 0.0
        self._undo_linears = self._undo_attention = None

    # ---- start-up ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Check the cache contract (allocating the KV memory), then compile and warm up every decode bucket."""
        t0 = time.perf_counter()
        self._undo_linears = transposed_linears(
            self.model, set(self.decode_sizes) | {n for n in TIMED_ROWS if n <= self.rows})
        self._undo_attention = decode_attention(self.model)
        self.steerer.prepare([None], [0])

        def fwd(ids, pos):
            return self._run(ids, pos, pos, slice(0, 1), pos.max().item() + 1)
        check_contract(self.model, fwd)
        self.cache.zero(0)
        self._idle(max(self.buckets))  # eager: grows the router's tables to the largest bucket
        if self.copts.enabled:
            if self.copts.backend == "inductor" and not self.copts.mode and self.device.type == "cuda":
                self.copts.mode = "reduce-overhead"
            lim = len(self.buckets) + 8
            cfg = torch._dynamo.config
            if getattr(cfg, "recompile_limit", 8) < lim:
                cfg.recompile_limit = lim
            if getattr(cfg, "cache_size_limit", 8) < lim:
                cfg.cache_size_limit = lim
            kw = {"mode": self.copts.mode} if self.copts.mode else {}
            self._decode = torch.compile(self._decode_eager, fullgraph=True, backend=self.copts.backend, **kw)
            self.compiled = True
            graphs = recompiles()
            for b in self.buckets:
                for n in (self.kv_step, 2 * self.kv_step):
                    self._idle(b, min(n, self.max_len))
            if recompiles() == graphs:  # the contract the recompilation count relies on
                log.warning("torch %s: dynamo's graph counter did not move while the decode step compiled, so "
                            "fusesteer_compile_recompiles cannot see recompilations", torch.__version__)
        self.recompiles_at_warmup = recompiles()
        self.warmup_s = time.perf_counter() - t0
        log.info("KV cache: %d slots x %d tokens (%.1f MiB), decode buckets %s, %s in %.1f s", self.rows,
                 self.max_len, self.cache.nbytes() / 2 ** 20, list(self.buckets),
                 f"compiled ({self.copts.backend}, {self.copts.mode or 'default'})" if self.copts.enabled
                 else "eager", self.warmup_s)

    def close(self) -> None:
        """Give the model back as it was (the Linear layers' own forward, sdpa attention)."""
        for undo in (self._undo_linears, self._undo_attention):
            if undo is not None:
                undo()
        self._undo_linears = self._undo_attention = None

    def recompiles_since_warmup(self) -> int:
        return 0 if self.recompiles_at_warmup is None else recompiles() - self.recompiles_at_warmup

    def _idle(self, b: int, n: int | None = None) -> None:
        """A decode forward of ``b`` idle rows (scratch writes only)."""
        t = self._inputs([0] * b, [0] * b, [self.cache.scratch] * b)
        self.steerer.prepare([None] * b, [0] * b)
        self.decode_tensors(t[0], t[1], t[2], n or self.kv_step)

    def _inputs(self, toks, pos, write):
        """The decode inputs as one host-to-device copy: ``[3, batch, 1]`` (ids, positions, write columns)."""
        return torch.tensor([toks, pos, write], dtype=torch.long).to(self.device).unsqueeze(-1)

    # ---- forwards ----------------------------------------------------------------------------------
    def _mask(self, qpos, n):
        return attention_mask(qpos, n, self.windows, self.kind, self.dtype)

    def _run(self, ids, qpos, write, slots, n):
        """One eager forward: tokens ``ids`` at positions ``qpos`` written to columns ``write`` of ``slots``,
        attending ``n`` columns; returns the last column's logits."""
        c = self.cache
        mask = self._mask(qpos, n)
        c.slots, c.write, c.span = slots, write, (mask if torch.is_tensor(mask) else mask["full_attention"])
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=qpos, use_cache=True, logits_to_keep=1,
                         **{self.cache_kw: c})
        return out.logits[:, -1, :]

    def _decode_eager(self, ids, qpos, write, mask):
        c = self.cache
        c.slots, c.write, c.span = None, write, (mask if torch.is_tensor(mask) else mask["full_attention"])
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=qpos, use_cache=True, logits_to_keep=1,
                         **{self.cache_kw: c})
        return out.logits[:, -1, :]

    def decode_tensors(self, ids, qpos, write, n: int):
        mask = self._mask(qpos, n)
        if self.compiled:
            for m in ([mask] if torch.is_tensor(mask) else mask.values()):
                torch._dynamo.mark_dynamic(m, 3)
            for t in (ids, qpos, write):
                torch._dynamo.mark_static(t, 0)
        return self._decode(ids, qpos, write, mask)

    # ---- KV-slot surgery and idling (rank 0 of a tensor-parallel server also tells the other ranks) ---------
    def copy(self, src: int, dst: int, n: int) -> None:
        self.cache.copy(src, dst, n)

    def zero(self, slot: int, n: int | None = None) -> None:
        self.cache.zero(slot, n)

    def tick(self) -> None:
        """Called while the engine is idle."""

    @property
    def decode_sizes(self) -> tuple[int, ...]:
        """The batch sizes a decode step runs at: the buckets when compiled (one graph each), else the padded
        sizes (:func:`padded_sizes` and the buckets)."""
        return self.buckets if self.copts.enabled else self.padded

    def bucket(self, busy: int) -> int:
        """The batch a decode step over slots ``[0, busy)`` runs at: the smallest decode size that holds them."""
        return next(b for b in self.decode_sizes if b >= busy)

    def decode(self, by_slot: list) -> tuple[torch.Tensor, int]:
        """One decode step. ``by_slot[i]``: None (idle) or (token, position, plan key, prompt length) for slot i
        (``len(by_slot)`` = highest busy slot + 1). Returns the logits ``[bucket, vocab]`` and the bucket."""
        b = self.bucket(len(by_slot))
        toks, pos, write, keys, plens = [0] * b, [0] * b, [self.cache.scratch] * b, [None] * b, [0] * b
        last = 0
        for i, r in enumerate(by_slot):
            if r is not None:
                toks[i], pos[i], keys[i], plens[i] = r
                write[i] = pos[i]
                last = max(last, pos[i])
        n = min(self.max_len, -(-(last + 1) // self.kv_step) * self.kv_step)
        t = self._inputs(toks, pos, write)
        self.steerer.prepare(keys, plens)
        return self.decode_tensors(t[0], t[1], t[2], n), b

    def prefill(self, chunks: list[Chunk]) -> torch.Tensor:
        """One eager forward over several rows' prompt chunks (left-padded); returns each row's last logits."""
        q = max(len(c.tokens) for c in chunks)
        k = len(chunks)
        ids = torch.zeros(k, q, dtype=torch.long)
        pos = torch.zeros(k, q, dtype=torch.long)
        write = torch.full((k, q), self.cache.scratch, dtype=torch.long)
        for i, c in enumerate(chunks):
            m = len(c.tokens)
            ids[i, q - m:] = torch.tensor(c.tokens, dtype=torch.long)
            pos[i, q - m:] = torch.arange(c.start, c.start + m)
            write[i, q - m:] = pos[i, q - m:]
        n = max(c.start + len(c.tokens) for c in chunks)
        slots = [c.slot for c in chunks]
        sl = slice(slots[0], slots[0] + k) if slots == list(range(slots[0], slots[0] + k)) else \
            torch.tensor(slots, dtype=torch.long, device=self.device)
        self.steerer.prepare([c.key for c in chunks], [c.prompt_len for c in chunks])
        return self._run(ids.to(self.device), pos.to(self.device), write.to(self.device), sl, n)
