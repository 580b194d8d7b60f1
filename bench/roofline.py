"""Static roofline of the fused kernels and of a steered decode step: a PREDICTION from bytes moved and HBM
bandwidth, not a measurement (part of the AOT report, :mod:`bench.aot`).

The bytes come from the traffic model the installed `fusesteer bench gpu` measures against
(:mod:`fusesteer.bench.traffic`: per kernel call, and per decode step of Llama-3-8B with bf16 weights, see
there); here they become predicted times: bytes / datasheet HBM bandwidth. Launch latency (a few µs per kernel)
is not modelled: below ~10^5 rows x 4096 columns it is larger than the predicted transfer time. The decode-step
ratio is steered / vanilla bytes, an upper bound of the bandwidth cost (fusion savings not credited).
"""

from __future__ import annotations

from fusesteer.bench.traffic import LLAMA3_8B, Arch, call_bytes, kernel_bytes, predicted_ratio, steered_added_bytes

#: HBM bandwidth in TB/s (datasheet peak; SXM parts)
GPUS = {"A100": 2.0, "H100": 3.35, "H200": 4.8}


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
def decode_table(arch: Arch = LLAMA3_8B, batches=(1, 8, 64)) -> list[dict]:
    vanilla = arch.step_weight_bytes()
    out = []
    for B in batches:
        for plans in ((1, 8) if B >= 8 else (1,)):
            add = steered_added_bytes(arch, B, plans)
            ratio = predicted_ratio(arch, B, plans)
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
