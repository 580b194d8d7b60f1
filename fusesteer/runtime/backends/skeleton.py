"""The decoder-layer skeleton both fused backends run, parameterised by an ops object.

    normed = ops.attn_input(x)                 # pre-attention norm (triton: the norm carried from the last layer)
    h, _ = attention(normed, **layer kwargs)   # HF's own attention module: caches, masks, variants untouched
    s, n2 = ops.mid(x, h)                      # (post-attention norm) + residual add + pre-FFN norm
    d = ops.mlp(n2)                            # GLU with the mlp.down_proj.in map, then the mlp.out map
    return ops.end(s, d)                       # (post-FFN norm) + residual add + layer.out map

The ops object (``TritonOps`` in ``backends/triton.py``) holds the layer's HF submodules (from the family adapter)
and its plan tables; the skeleton holds the order. (The ``torch`` backend does not re-run the skeleton: it wraps
the forwards already installed around each site.)
"""

from __future__ import annotations


def layer_forward(ops, as_tuple: bool = False):
    """The fused forward of one decoder layer; ``as_tuple``: return ``(hidden_states,)`` as the HF layer does
    in releases where its forward returns a tuple."""
    attn = ops.modules.attn

    def forward(hidden_states, **kwargs):
        normed = ops.attn_input(hidden_states)
        h = attn(hidden_states=normed, **kwargs)[0]
        s, n2 = ops.mid(hidden_states, h)
        out = ops.end(s, ops.mlp(n2))
        return (out,) if as_tuple else out
    return forward
