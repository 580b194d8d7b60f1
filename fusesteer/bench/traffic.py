"""Bytes the fused kernels and a steered decode step move: the traffic model `fusesteer bench gpu` divides by
its measured time (GB/s, % of peak) and sets next to its measured decode ratios.

* Per kernel call: ``bytes = rows x bytes_per_row + fixed_bytes``. The bytes are the minimum each kernel must
  move: every activation row read once and written once, norm weights once per call, the plan-table rows (a and
  b, float32) once per distinct plan (1 for a uniform map, up to 8 for the 8 per-row plans).
* Per decode step (bf16 weights): vanilla = the weight bytes one step streams (every decoder layer's
  projections and norms, the LM head; KV-cache reads left out, which makes the ratio an upper bound);
  steered = vanilla + what the ``triton`` backend adds for the bench's plans: the plan-table rows it reads at
  each steered site and the extra read + write of the ``attn.o_proj.in`` activations by ``affine_map`` (the
  other maps are fused into kernels that replace vanilla's own add / RMSNorm / GLU ops, whose saved traffic is
  not credited). Predicted ratio = steered / vanilla bytes.

Turning these bytes into predicted times per GPU (the static roofline of the AOT report) is developer tooling in
the source checkout (``bench/roofline.py``), not part of the installed package.
"""

from __future__ import annotations

from dataclasses import dataclass

ELEM = {"fp32": 4, "fp16": 2, "bf16": 2}
TABLE_ELEM = 4  # plan tables are float32


def kernel_bytes(kernel: str, dtype: str, width: int, map_: str, family: str | None = None) -> dict:
    """Bytes one kernel call moves: ``per_row`` (activations: every row read and written once) and
    ``fixed`` (norm weights once per call) plus ``table`` (one plan's a and b rows; a uniform map reads one,
    a per-row map one per distinct plan in the batch, see :func:`call_bytes`)."""
    e, W = ELEM[dtype], int(width)
    if kernel == "add_rmsnorm":
        per_row = 4 * W * e  # read residual, delta; write s, normed
        fixed = W * e * (2 if family == "gemma" else 1)  # norm weight (+ Gemma's post-norm weight)
    elif kernel == "glu":
        per_row, fixed = 3 * W * e, 0  # read gate, up; write y
    elif kernel == "affine":
        per_row, fixed = 2 * W * e, 0  # read x; write y
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    if map_ not in ("none", "uniform", "per-row"):
        raise ValueError(f"map must be none, uniform or per-row, got {map_!r}")
    return {"per_row": per_row, "fixed": fixed, "table": 0 if map_ == "none" else 2 * W * TABLE_ELEM}


def call_bytes(b: dict, rows: int, map_: str, plans: int = 8) -> int:
    """Bytes of one call over ``rows`` rows; a per-row map with ``plans`` distinct plans in the batch."""
    tables = 0 if map_ == "none" else (1 if map_ == "uniform" else min(rows, plans))
    return rows * b["per_row"] + b["fixed"] + tables * b["table"]


# --------------------------------------------------------------------------------------------------
# decode step
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    weight_bytes: int = 2  # bf16

    def layer_params(self) -> int:
        h, i = self.hidden, self.intermediate
        q = h * self.heads * self.head_dim
        kv = 2 * h * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * h
        return q + kv + o + 3 * h * i + 2 * h

    def step_weight_bytes(self) -> int:
        """Weights one decode step streams: all layers, the final norm and the LM head."""
        return self.weight_bytes * (self.layers * self.layer_params() + self.hidden + self.vocab * self.hidden)


LLAMA3_8B = Arch("Llama-3-8B", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128,
                 vocab=128256)
SMOLLM2_135M = Arch("SmolLM2-135M", hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, head_dim=64,
                    vocab=49152)
GEMMA3_270M = Arch("Gemma-3-270M", hidden=640, intermediate=2048, layers=18, heads=4, kv_heads=1, head_dim=256,
                   vocab=262144)
ARCHS = {"llama-3-8b": LLAMA3_8B, "smollm2-135m": SMOLLM2_135M, "gemma3-270m": GEMMA3_270M}


def predicted_ratio(arch: Arch, batch: int, plans: int) -> float:
    """Predicted steered / vanilla decode-step bytes (see the module docstring)."""
    vanilla = arch.step_weight_bytes()
    return (vanilla + steered_added_bytes(arch, batch, plans)["step"]) / vanilla


def steered_added_bytes(arch: Arch, batch: int, plans: int, act_bytes: int = 2) -> dict:
    """Bytes the ``triton`` backend adds to one decode step for the bench plans (all-layer ``layer.out``
    blend + k = 100 gains on ``attn.o_proj.in`` and on ``mlp.down_proj.in``), counted as if every layer
    had gains at both sites (k = 100 over 32 layers reaches ~31 of them). ``plans``: distinct plans in
    the batch (1 = uniform; 8 = the per-row scenario), each reading its own table rows."""
    h, i = arch.hidden, arch.intermediate
    attn_w = arch.heads * arch.head_dim
    distinct = min(plans, batch)
    tables = distinct * 2 * TABLE_ELEM * (h + i + attn_w)  # layer.out, mlp.down_proj.in, attn.o_proj.in
    affine_pass = 2 * batch * attn_w * act_bytes  # affine_map reads and writes the o_proj input
    per_layer = tables + affine_pass
    return {"per_layer": per_layer, "tables_per_layer": tables, "affine_pass_per_layer": affine_pass,
            "step": arch.layers * per_layer}
