"""Static roofline of the fused kernels and of a steered decode step: a PREDICTION from bytes moved and HBM
bandwidth, not a measurement.

* Per kernel call: ``bytes = rows x bytes_per_row + fixed_bytes``; predicted time = bytes / bandwidth. The
  bytes are the minimum each kernel must move: every activation row read once and written once, norm weights
  once per call, the plan-table rows (a and b, float32) once per distinct plan (1 for a uniform map, up to 8
  for the 8 per-row plans). Launch latency (a few µs per kernel) is not modelled: below ~10^5 rows x 4096 columns it is
  larger than the predicted transfer time.
* Per decode step of Llama-3-8B (bf16 weights): vanilla = the weight bytes one step streams (every decoder
  layer's projections and norms, the LM head; KV-cache reads left out, which makes the ratio an upper bound);
  steered = vanilla + what the ``triton`` backend adds for the bench's plans: the plan-table rows it reads at
  each steered site and the extra read + write of the ``attn.o_proj.in`` activations by ``affine_map`` (the
  other maps are fused into kernels that replace vanilla's own add / RMSNorm / GLU ops, whose saved traffic is
  not credited). Ratio = steered / vanilla bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

#: HBM bandwidth in TB/s (datasheet peak; SXM parts)
GPUS = {"A100": 2.0, "H100": 3.35, "H200": 4.8}
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


def predicted_us(nbytes: float, tb_per_s: float) -> float:
    return nbytes / (tb_per_s * 1e12) * 1e6


# --------------------------------------------------------------------------------------------------
# per-call table
# --------------------------------------------------------------------------------------------------
LLAMA3_8B_WIDTHS = {"add_rmsnorm": 4096, "glu": 14336, "affine": 4096}


def kernel_table(rows=(1, 64, 4096), dtype: str = "bf16") -> list[dict]:
    """Predicted µs per call of each kernel at Llama-3-8B widths, a uniform map and 8 per-row plans."""
    out = []
    for kernel, W in LLAMA3_8B_WIDTHS.items():
        family = "llama"
        for map_ in ("uniform", "per-row"):
            b = kernel_bytes(kernel, dtype, W, map_, family)
            for M in rows:
                nbytes = call_bytes(b, M, map_)
                out.append({"kernel": kernel, "dtype": dtype, "width": W, "map": map_, "rows": M,
                            "bytes": nbytes, "bytes_per_row": b["per_row"], "fixed_bytes": nbytes - M * b["per_row"],
                            "predicted_us": {g: predicted_us(nbytes, bw) for g, bw in GPUS.items()}})
    return out


# --------------------------------------------------------------------------------------------------
# decode step of Llama-3-8B
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


def decode_table(arch: Arch = LLAMA3_8B, batches=(1, 8, 64)) -> list[dict]:
    vanilla = arch.step_weight_bytes()
    out = []
    for B in batches:
        for plans in ((1, 8) if B >= 8 else (1,)):
            add = steered_added_bytes(arch, B, plans)
            ratio = (vanilla + add["step"]) / vanilla
            out.append({"model": arch.name, "batch": B, "plans": plans, "vanilla_bytes": vanilla,
                        "added_bytes": add["step"], "added_per_layer": add["per_layer"],
                        "predicted_ratio": ratio,
                        "predicted_vanilla_us": {g: predicted_us(vanilla, bw) for g, bw in GPUS.items()},
                        "predicted_added_us": {g: predicted_us(add["step"], bw) for g, bw in GPUS.items()}})
    return out


def roofline() -> dict:
    return {"label": "PREDICTION (static roofline: bytes / datasheet HBM bandwidth), not a measurement",
            "gpus_tb_per_s": dict(GPUS), "kernels": kernel_table(), "decode": decode_table(),
            "notes": ["launch latency and kernel gaps are not modelled",
                      "decode: vanilla = weight bytes only (KV-cache reads left out), fusion savings not "
                      "credited: the predicted ratio is an upper bound of the bandwidth cost"]}


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{int(n)} B"


def markdown(r: dict | None = None) -> list[str]:
    r = r or roofline()
    gpus = list(r["gpus_tb_per_s"])
    L = [f"**{r['label']}** (HBM: " + ", ".join(f"{g} {bw} TB/s" for g, bw in r["gpus_tb_per_s"].items()) + ")",
         "", "Per kernel call at Llama-3-8B widths, bf16, uniform map or 8 per-row plans (predicted µs):", "",
         "| kernel | W | map | rows | bytes | " + " | ".join(gpus) + " |",
         "|---|---|---|---|---|" + "---|" * len(gpus)]
    for k in r["kernels"]:
        L.append(f"| {k['kernel']} | {k['width']} | {k['map']} | {k['rows']} | {_fmt_bytes(k['bytes'])} | "
                 + " | ".join(f"{k['predicted_us'][g]:.3g}" for g in gpus) + " |")
    L += ["", "Decode step of Llama-3-8B (bf16), all-layer blend + 100 gains (1 plan) or 8 per-row plans "
          "(predicted steered / vanilla):", "",
          "| batch | plans | vanilla bytes | added bytes | predicted ratio | vanilla µs " + "/".join(gpus) + " |",
          "|---|---|---|---|---|---|"]
    for d in r["decode"]:
        L.append(f"| {d['batch']} | {d['plans']} | {_fmt_bytes(d['vanilla_bytes'])} | "
                 f"{_fmt_bytes(d['added_bytes'])} | {d['predicted_ratio']:.5f} | "
                 + " / ".join(f"{d['predicted_vanilla_us'][g]:.0f}" for g in gpus) + " |")
    L += [""] + [f"- {n}" for n in r["notes"]]
    return L
