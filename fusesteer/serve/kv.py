"""Preallocated KV memory with one slot per batch row (gpt-fast style), and the attention masks that go with it.

Every layer's keys and values live in one tensor ``[rows, kv_heads, max_len + 1, head_dim]`` allocated once (its
address never changes: ``torch._dynamo.mark_static_address``, so a compiled decode step and a CUDA graph see
the same memory). Row ``r`` of a forward writes its token at position ``p`` into column ``p`` of its slot; the
last column (``max_len``) is a scratch column where padding tokens and idle rows write, never attended.

A forward attends over the first ``n`` columns of its slots with a 4-D mask built here (``n`` rounded up to
``step`` columns so a compiled decode sees few distinct lengths); row ``r``'s token at position ``p`` sees the
columns ``j <= p`` of its own slot (and ``j > p - window`` at sliding-window layers). So rows of different
lengths, admitted and retired at any step, share one fixed-shape decode forward.

The cache object given to the model is a ``transformers.Cache`` subclass (:class:`SlotCache`) whose ``update``
writes at the per-row columns set before the forward (``write``) and returns the attended view. The model's
own mask creation returns a 4-D mask unchanged, so attention itself is transformers' (sdpa or eager), except
one-token queries on CPU sdpa models, which :func:`decode_attention` sends through two grouped matmuls.
:func:`check_contract` runs the model once with this cache against a plain forward at start-up.
"""

from __future__ import annotations

import torch

from ..runtime.compat import Cache, CacheLayerMixin

__all__ = ["SlotCache", "attention_mask", "check_contract", "decode_attention", "grouped_decode_attention",
           "mask_kind"]

SUPPORTED_ATTENTION = ("sdpa", "eager")
DECODE_ATTENTION = "fusesteer_decode"  # the name :func:`decode_attention` registers the attention function under


class _SlotLayer(CacheLayerMixin):
    """Bookkeeping face of one layer (the tensors and the writes are the :class:`SlotCache`'s)."""

    is_compileable = True
    is_sliding = False
    is_croppable = False

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len = max_len

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated by SlotCache
        return None

    def update(self, key_states, value_states, *args, **kwargs):  # SlotCache.update does the work
        raise NotImplementedError("SlotCache layers are written through SlotCache.update")

    def get_mask_sizes(self, *args, **kwargs):
        return self.max_len, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return self.max_len

    def get_max_cache_shape(self) -> int:  # transformers 5.0's name of get_max_length
        return self.max_len


class SlotCache(Cache):
    """``rows`` slots of ``max_len`` tokens for each of ``n_layers`` layers; tensors allocated by :meth:`allocate`
    (or at the first write, with the shapes the model's attention hands over).

    Per forward the host sets ``write`` (``[batch, q]`` int64: the column of each token), ``span`` (the mask:
    its last dim is the number of columns attended) and ``slots`` (None: batch row i is slot i; a ``slice``; or
    an index tensor of slots, gathered)."""

    def __init__(self, rows: int, max_len: int, n_layers: int, device=None):
        super().__init__(layers=[_SlotLayer(max_len) for _ in range(n_layers)])
        self.rows, self.max_len, self.n_layers = int(rows), int(max_len), int(n_layers)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.key_cache: list[torch.Tensor | None] = [None] * n_layers
        self.value_cache: list[torch.Tensor | None] = [None] * n_layers
        self.row_ids = torch.arange(self.rows, device=self.device).unsqueeze(1)  # [rows, 1]
        self.write: torch.Tensor | None = None
        self.span: torch.Tensor | None = None
        self.slots = None

    @property
    def scratch(self) -> int:
        return self.max_len

    def _alloc(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        shape = lambda t: (self.rows, t.shape[1], self.max_len + 1, t.shape[3])  # noqa: E731
        self.key_cache[i] = torch.zeros(shape(k), dtype=k.dtype, device=k.device)
        self.value_cache[i] = torch.zeros(shape(v), dtype=v.dtype, device=v.device)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.key_cache[i])
            torch._dynamo.mark_static_address(self.value_cache[i])

    @property
    def allocated(self) -> bool:
        return all(k is not None for k in self.key_cache)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.key_cache + self.value_cache if t is not None)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.key_cache[layer_idx] is None:
            self._alloc(layer_idx, key_states, value_states)
        k, v = self.key_cache[layer_idx], self.value_cache[layer_idx]
        n = self.span.shape[-1]
        b = key_states.shape[0]
        sl = self.slots
        if sl is None or isinstance(sl, slice):
            kk, vv = (k, v) if sl is None else (k[sl], v[sl])
            rows = self.row_ids[:b]
            kk[rows, :, self.write] = key_states.transpose(1, 2).to(k.dtype)
            vv[rows, :, self.write] = value_states.transpose(1, 2).to(v.dtype)
            return kk[:b, :, :n], vv[:b, :, :n]
        rows = sl[:, None]
        k[rows, :, self.write] = key_states.transpose(1, 2).to(k.dtype)
        v[rows, :, self.write] = value_states.transpose(1, 2).to(v.dtype)
        return k[:, :, :n].index_select(0, sl), v[:, :, :n].index_select(0, sl)  # gathers n columns, not max_len

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    # ---- slot surgery (host side, between forwards) ------------------------------------------------
    def copy(self, src: int, dst: int, n: int, start: int = 0) -> None:
        """Copy columns ``[start, n)`` of slot ``src`` into slot ``dst`` (every layer)."""
        if n <= start or src == dst:
            return
        for t in self.key_cache + self.value_cache:
            if t is not None:
                t[dst, :, start:n] = t[src, :, start:n]

    def zero(self, slot: int, n: int | None = None) -> None:
        """Zero the first ``n`` columns of a slot (all of it by default): a row that went non-finite leaves no
        NaN behind for the next owner (a masked NaN still poisons attention as 0 * NaN)."""
        for t in self.key_cache + self.value_cache:
            if t is not None:
                t[slot, :, : (self.max_len + 1 if n is None else n)] = 0


def mask_kind(model) -> str:
    """The attention implementation the masks are built for; refuses the ones a 4-D mask does not reach."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl == DECODE_ATTENTION:  # another engine's decode_attention on this model: sdpa with a faster decode
        return "sdpa"
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(f"the server's static KV cache needs sdpa or eager attention, the model uses {impl!r}; "
                         f"load it with attn_implementation='sdpa'")
    return impl


def layer_windows(model) -> dict[str, int | None]:
    """Attention window per mask kind the model's forward asks for: {'full_attention': None} plus
    {'sliding_attention': w} when some layer slides (models with ``layer_types``); a model whose every layer
    slides (``sliding_window`` without ``layer_types``) gets the window in its one mask."""
    cfg = model.config
    w = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types:
        out: dict = {"full_attention": None}
        if "sliding_attention" in types:
            out["sliding_attention"] = int(w)
        return out
    if w is not None and getattr(cfg, "use_sliding_window", True) is not False:
        return {"full_attention": int(w)}
    return {"full_attention": None}


def attention_mask(qpos: torch.Tensor, n: int, windows: dict, kind: str, dtype):
    """The model's attention mask for queries at positions ``qpos`` ``[batch, q]`` over ``n`` slot columns: a
    4-D tensor, or a dict by layer type when the model has sliding layers. Bool for sdpa (True = attend),
    additive float for eager."""
    cols = torch.arange(n, device=qpos.device)[None, None, :]
    q = qpos[:, :, None]

    def one(window):
        m = cols <= q
        if window is not None:
            m = m & (cols > q - window)
        m = m[:, None]
        if kind == "eager":
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
        return m

    masks = {k: one(w) for k, w in windows.items()}
    return masks["full_attention"] if len(masks) == 1 else masks


def grouped_decode_attention(query, key, value, mask, scaling: float):
    """Attention of one query token per row over its slot's columns, with grouped query heads, as two batched
    matmuls and a softmax: ``query [B, H, 1, D]``, ``key`` / ``value [B, KV, n, D]`` (H a multiple of KV: each key
    head serves H / KV query heads, never copied), ``mask [B, 1, 1, n]`` (bool, True = attend; or additive float).
    Returns ``[B, 1, H, D]`` (the layout transformers' attention functions return). Scores and softmax in fp32."""
    b, h, _, d = query.shape
    kv = key.shape[1]
    q = query.reshape(b, kv, h // kv, d)  # [B, KV, g, D]: the g query heads of each key head as rows
    s = torch.matmul(q, key.transpose(-1, -2)).float() * scaling  # [B, KV, g, n]
    m = mask.reshape(b, 1, 1, -1)
    s = s.masked_fill(~m, torch.finfo(s.dtype).min) if m.dtype == torch.bool else s + m.float()
    p = torch.softmax(s, dim=-1).to(value.dtype)
    return torch.matmul(p, value).reshape(b, 1, h, d)


def _decode_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs):
    """An attention function for transformers' attention interface: one-token queries with a 4-D mask go through
    :func:`grouped_decode_attention`; everything else (prefill chunks, sinks, position biases, dropout) goes to
    transformers' own sdpa function unchanged."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    plain = all(kwargs.get(k) is None for k in ("softcap", "s_aux", "sinks", "position_bias")) \
        and not dropout and not kwargs.get("output_attentions")
    if (query.shape[2] == 1 and plain and torch.is_tensor(attention_mask) and attention_mask.dim() == 4
            and tuple(attention_mask.shape[:3]) == (query.shape[0], 1, 1) and query.shape[1] % key.shape[1] == 0):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return grouped_decode_attention(query, key, value, attention_mask, scale), None
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)


def decode_attention(model):
    """CPU only: switch an sdpa model to :func:`_decode_attention_forward` (registered with transformers'
    ``AttentionInterface`` under ``DECODE_ATTENTION``). transformers' sdpa copies every key and value head once
    per query head under a mask (``repeat_kv``; always in 5.0, and under ``torch.compile`` in later releases),
    and its CPU kernel is slow for one-token queries: SmolLM2-135M (9 query / 3 key heads, 96 columns, 32 rows,
    2 threads): 5.6 ms per layer with the copy, 0.2 ms here; the compiled decode step at 32 rows, 166 -> 126 ms.
    Returns the undo (back to sdpa), or None when nothing was changed (not sdpa, not on CPU, or this
    transformers refuses a registered attention function)."""
    from transformers import AttentionInterface

    if getattr(model.config, "_attn_implementation", None) != "sdpa" or next(model.parameters()).device.type != "cpu":
        return None
    AttentionInterface.register(DECODE_ATTENTION, _decode_attention_forward)
    try:
        model.set_attn_implementation(DECODE_ATTENTION)
    except (ValueError, TypeError, AttributeError, KeyError):
        return None
    if getattr(model.config, "_attn_implementation", None) != DECODE_ATTENTION:
        return None

    def undo() -> None:
        model.set_attn_implementation("sdpa")
    return undo


def check_contract(model, forward, tol: float = 1e-3) -> None:
    """Run ``forward`` (the engine's cached forward: ids, positions, write columns, mask -> logits) on a short
    sequence in two chunks and one decode token, against one plain uncached forward of the same tokens; raise
    RuntimeError when they differ (this transformers version or model does not honour the cache contract)."""
    from ..runtime.compat import with_cache  # noqa: F401 - documented dependency of `forward`

    cfg = model.config
    w = getattr(cfg, "sliding_window", None) or 0
    t = max(6, min(2 * int(w) + 3, 40)) if w else 9
    g = torch.Generator().manual_seed(0)
    dev = next(model.parameters()).device
    ids = torch.randint(3, int(cfg.vocab_size), (1, t), generator=g).to(dev)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits[0].float()
        cut = t // 2
        a = forward(ids[:, :cut], torch.arange(cut, device=dev)[None])
        b = forward(ids[:, cut:t - 1], torch.arange(cut, t - 1, device=dev)[None])
        c = forward(ids[:, t - 1:], torch.tensor([[t - 1]], device=dev))
    got = torch.stack([a[0], b[0], c[0]]).float()
    want = ref[[cut - 1, t - 2, t - 1]]
    err = (got - want).abs().max().item()
    scale = want.abs().max().item() + 1e-6
    if not err <= tol * max(1.0, scale):
        raise RuntimeError(f"the static KV cache does not reproduce the model's own forward with this transformers "
                           f"version / model (max logit error {err:.3g}); the server cannot serve it")
