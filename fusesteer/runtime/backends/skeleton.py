"""The decoder-layer skeleton both fused backends run, parameterised by an ops object.

    normed = ops.attn_input(x)                 # pre-attention norm (triton: the norm carried from the last layer)
    h, _ = attention(normed, **layer kwargs)   # HF's own attention module: caches, masks, variants untouched
    s, n2 = ops.mid(x, h)                      # (post-attention norm) + residual add + pre-FFN norm
    d = ops.mlp(n2)                            # GLU with the mlp.down_proj.in map, then the mlp.out map
    return ops.end(s, d)                       # (post-FFN norm) + residual add + layer.out map

The ops objects (``TorchOps`` in ``backends/torch.py``, ``TritonOps`` in ``backends/triton.py``) hold the
layer's HF submodules (from the family adapter) and its plan tables; the skeleton holds the order.
"""

from __future__ import annotations


def layer_forward(ops):
    attn = ops.modules.attn

    def forward(hidden_states, **kwargs):
        normed = ops.attn_input(hidden_states)
        h, _ = attn(hidden_states=normed, **kwargs)
        s, n2 = ops.mid(hidden_states, h)
        return ops.end(s, ops.mlp(n2))
    return forward
