"""Outputs of the bench: JSON (with machine info), a Markdown report and PNG plots.

Files in the output folder:

* ``parity.json`` / ``latency.json`` -- ``{"machine": {...}, "result": {...}}``, one per suite run;
* ``report.md`` -- rebuilt from whichever of the two JSON files exist, so running the suites separately
  still gives one report;
* ``latency_ratios.png`` -- median steered/vanilla ratio per arm with its 95% bootstrap CI as whiskers;
* ``parity_layers.png`` -- per-layer max |layer.out - reference| (relative to the layer's largest activation)
  for every arm (fp32 rows).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

PARITY_JSON = "parity.json"
LATENCY_JSON = "latency.json"
LATENCY_COPIES_JSON = "latency-copies.json"  # --protocol copies
REPORT_MD = "report.md"
LATENCY_PNG = "latency_ratios.png"
LATENCY_COPIES_PNG = "latency_ratios-copies.png"
PARITY_PNG = "parity_layers.png"
ZERO_FLOOR = 1e-9  # bit-exact layers are drawn at this height on the log axis


def _clean(x):
    """JSON-safe: NaN/inf become strings, tuples lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: Path, machine: dict, result: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean({"machine": machine, "result": result}), indent=1, allow_nan=False))
    tmp.replace(path)
    return path


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------
def _f(x, spec=".3f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "–"


def _ratio_cell(s: dict | None) -> str:
    if not s or "ratio_median" not in s:
        return "–"
    return f"{s['ratio_median']:.3f} [{s['ratio_ci_low']:.3f}, {s['ratio_ci_high']:.3f}]"


def machine_md(m: dict) -> list[str]:
    v = m.get("versions", {})
    gpu = m.get("gpu")
    lines = [
        f"- machine: {m.get('cpu_model')} ({m.get('cpu_cores_logical')} logical cores), "
        f"{'GPU ' + gpu['name'] if gpu else 'no GPU'}; torch threads {m.get('torch_threads')}; "
        f"load average (1/5/15 min) at start {m.get('load_average_1_5_15')}",
        f"- versions: torch {v.get('torch')}, triton {v.get('triton')}, transformers {v.get('transformers')}, "
        f"bitsandbytes {v.get('bitsandbytes')}, steering-vectors {v.get('steering-vectors')}, "
        f"repeng {v.get('repeng')}; fusesteer commit {str(m.get('fusesteer_commit'))[:12]}; {m.get('date_utc')}",
    ]
    return lines


def parity_md(doc: dict) -> list[str]:
    m, r = doc["machine"], doc["result"]
    L = [f"## Parity ({r['mode']})", ""]
    L += machine_md(m)
    cnt = ", ".join(f"{k}: {v}" for k, v in r["counts"].items())
    L += [f"- gate: **{'PASS' if r['ok'] else 'FAIL'}** ({cnt}); {r['seconds']} s; prompt {r['config']['batch']}"
          f" × {r['config']['prompt_len']} tokens, {r['config']['steps']} teacher-forced greedy steps",
          "- thresholds (fusesteer/tolerances.py, the tests' thresholds): " + "; ".join(
              f"{k}: {v['max_abs_logit']}" for k, v in r["thresholds"].items() if isinstance(v, dict)),
          f"- peers: {', '.join(f'{k} {v}' for k, v in r['peers'].items())}"]
    tq = r["config"].get("triton_quick_rows")
    if isinstance(tq, list):
        L.append(f"- quick mode on CPU: Triton (interpreter) rows only for {', '.join(tq)}")
    L += ["- *vs fp32*: max |prefill logit − fp32 reference logit| of the arm / of the reference at the same dtype "
          "(informational: is the arm further from the fp32 result than the reference's own rounding?)",
          "", "| model | dtype | plan | arm | status | max abs Δlogit | tol | KL max | greedy agree | vs fp32 "
          "(arm / ref) | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes: dict[str, int] = {}
    for row in r["rows"]:
        note = ""
        if row.get("reason"):
            key = row["reason"]
            if key not in notes:
                notes[key] = len(notes) + 1
            note = f"[{notes[key]}]"
        status = row["status"] if row["status"] == "pass" else f"**{row['status']}**"
        vs = (f"{row['vs_fp32']:.2g} / {row['ref_vs_fp32']:.2g}" if "vs_fp32" in row and "ref_vs_fp32" in row
              else "–")
        if "max_abs" in row:
            L.append(f"| {row['model']} | {row['dtype']} | {row['plan']} | {row['arm']} | {status} | "
                     f"{row['max_abs']:.2e} | {row['tol']:.1e} | {row['kl_max']:.1e} | {row['agree']:.0%} | {vs} | "
                     f"{note} |")
        else:
            L.append(f"| {row['model']} | {row['dtype']} | {row['plan']} | {row['arm']} | {status} | – | – | – | – "
                     f"| – | {note} |")
    if notes:
        L += ["", "Notes:", ""]
        L += [f"{i}. {text}" for text, i in notes.items()]
    return L


def latency_md(doc: dict) -> list[str]:
    m, r = doc["machine"], doc["result"]
    c = r["config"]
    proto = c.get("protocol", "attach")
    L = [f"## Latency ({r['mode']}, protocol `{proto}`): {r['model']} {r['dtype']}", ""]
    L += machine_md(m)
    L += [f"- method: one step at a time, arms interleaved in a random order every cycle, {c['warmup']} warm-up "
          f"cycles, decode: {c['decode_cycles']} cycles on a fixed {c['prompt_len']}-token KV cache (cropped back "
          f"after each step), prefill: {c['prefill_cycles']} cycles of a {c['prompt_len']}-token prompt; timer "
          f"{c['timer']}; ratios are arm/vanilla within a cycle: median [95% bootstrap CI]; protocol `{proto}`: "
          + ("each arm is set up (attach / hooks / fold) right before its timed step and torn down after it, on "
             "one model; " + ("every timed step of a fusesteer arm is then the first forward after an attach, "
                              "which runs the one-time finite check of `attach(check_finite=True)` (an isfinite "
                              "pass per steered site): a per-attach cost included here"
                              if c.get("check_finite", True) else
                              "our arms are attached with `check_finite=False` (that check runs once per attach "
                              "and would otherwise be charged to every timed step)") if proto == "attach" else
             "each arm runs on its own deep copy of the model, set up once and left in place, with its own KV "
             "cache (steady state: no set-up next to a timed step; the one-time first-forward check is done in "
             "the untimed prefill / warm-up)"),
          f"- load average before / after: {r.get('load_average_before')} / {r.get('load_average_after')}; "
          f"{r['seconds']} s",
          f"- plans: {json.dumps(r['plans'])}",
          f"- fused backend here: `{r['fused_backend']}`", ""]
    for sc in r["scenarios"]:
        phases = sc["phases"]
        L += [f"### {sc['scenario']}, batch {sc['batch']}", ""]
        L += ["| arm | " + " | ".join(f"{p} ms | {p} ratio [CI] | {p} min–max" for p in phases) + " |",
              "|---|" + "---|---|---|" * len(phases)]
        for arm in sc["arms"]:
            cells = []
            for p, ph in phases.items():
                s = ph["arms"].get(arm, {})
                cells += [_f(s.get("median_ms"), ".2f"),
                          "1 (baseline)" if arm == "vanilla" else _ratio_cell(s),
                          "–" if arm == "vanilla" else f"{_f(s.get('ratio_min'))}–{_f(s.get('ratio_max'))}"]
            L.append(f"| {arm} | " + " | ".join(cells) + " |")
        cross = {k: v for p, ph in phases.items() for k, v in ph["cross"].items()}
        if sc["scenario"] == "additive" and cross:
            L += ["", "Paired ratios between arms (same cycles):", "",
                  "| ratio | " + " | ".join(phases) + " |", "|---|" + "---|" * len(phases)]
            for k in cross:
                L.append(f"| {k} | " + " | ".join(_ratio_cell(ph["cross"].get(k)) for ph in phases.values()) + " |")
        for n in sc["notes"]:
            L.append(f"- `{n['arm']}` {n['status']}: {n['reason']}")
        L.append("")
    L += ["### Targets", ""]
    if r["mode"] == "quick":
        L.append("_quick mode: a tiny random model; these ratios say nothing about the targets._")
        L.append("")
    L += ["| target | ratio | scenario | batch | phase | median [CI] | limit | met |",
          "|---|---|---|---|---|---|---|---|"]
    for t in r["targets"]:
        L.append(f"| {t['target']} | {t['what']} | {t['scenario']} | {t['batch']} | {t['phase']} | "
                 f"{t['median']:.3f} [{t['ci'][0]:.3f}, {t['ci'][1]:.3f}] | ≤ {t['limit']} | "
                 f"{'yes' if t['met'] else '**no**'} |")
    L += ["", "### Static cache + torch.compile(fullgraph): compiled steered vs compiled vanilla", ""]
    for cc in r.get("compiled", []):
        if cc.get("status") not in ("pass", "FAIL"):
            L.append(f"- {cc.get('status')}: {cc.get('reason') or ''}")
            continue
        L.append(f"- batch {cc['batch']} ({cc['backend']}, mode {cc['mode']}): {cc['status']}; compiled "
                 f"steered/vanilla {_ratio_cell(cc['timing'].get('steered'))}, compiled/eager vanilla "
                 f"{_ratio_cell(cc.get('compiled_vs_eager_vanilla'))}; update(): counter deltas "
                 f"{cc['dynamo_counts_delta_after_update']}, logits changed {cc['update_changed_logits']}")
    return L


def write_report(out: Path) -> Path:
    parts = ["# fusesteer bench results", ""]
    for name, fn in ((PARITY_JSON, parity_md), (LATENCY_JSON, latency_md), (LATENCY_COPIES_JSON, latency_md)):
        doc = read_json(out / name)
        if doc is not None:
            parts += fn(doc) + [""]
    for png in (LATENCY_PNG, LATENCY_COPIES_PNG, PARITY_PNG):
        if (out / png).exists():
            parts += [f"![{png}]({png})", ""]
    path = out / REPORT_MD
    path.write_text("\n".join(parts))
    return path


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------
def plots_unavailable() -> str | None:
    """None when matplotlib can draw the PNG plots, else why not: matplotlib is an extra (``fusesteer[methods]``),
    so a plain install runs every suite and skips the plots with this note."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        return f"matplotlib is not installed ({e}); pip install matplotlib (or 'fusesteer[methods]') for them"
    return None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency(doc: dict, path: Path) -> Path | None:
    r = doc["result"]
    scen = r["scenarios"]
    if not scen:
        return None
    plt = _plt()
    names = sorted({s["scenario"] for s in scen}, key=["blend+gains", "additive", "per-row"].index)
    phases = list(scen[0]["phases"])
    fig, axes = plt.subplots(len(names), len(phases), figsize=(6.2 * len(phases), 3.3 * len(names)),
                             squeeze=False)
    colors = {1: "#4C72B0", 8: "#DD8452"}
    targets = {"blend+gains": [(1.02, "fused ≤ 1.02"), (1.005, "fold ≤ 1.005")], "per-row": [(1.05, "≤ 1.05")],
               "additive": []}
    for i, name in enumerate(names):
        for j, phase in enumerate(phases):
            ax = axes[i][j]
            entries = [s for s in scen if s["scenario"] == name]
            arms = [a for a in entries[0]["arms"] if a != "vanilla"]
            width = 0.8 / max(1, len(entries))
            for k, sc in enumerate(entries):
                summ = sc["phases"][phase]["arms"]
                xs, ys, lo, hi = [], [], [], []
                for x, a in enumerate(arms):
                    s = summ.get(a)
                    if not s or "ratio_median" not in s:
                        continue
                    xs.append(x + (k - (len(entries) - 1) / 2) * width)
                    ys.append(s["ratio_median"])
                    lo.append(s["ratio_median"] - s["ratio_ci_low"])
                    hi.append(s["ratio_ci_high"] - s["ratio_median"])
                ax.bar(xs, ys, width=width * 0.95, yerr=[lo, hi], capsize=3, color=colors.get(sc["batch"], "#888"),
                       label=f"batch {sc['batch']}")
            ax.axhline(1.0, color="black", lw=0.8)
            for n_t, (y, lab) in enumerate(targets.get(name, [])):
                ax.axhline(y, color="#C44E52", lw=0.8, ls="--")
                ax.text(-0.5 if n_t else len(arms) - 0.5, y, lab, color="#C44E52", fontsize=7, va="bottom",
                        ha="left" if n_t else "right")
            ax.set_xticks(range(len(arms)))
            ax.set_xticklabels(arms, rotation=20, fontsize=8)
            ax.set_ylabel("time / vanilla")
            ax.set_title(f"{name} — {phase}", fontsize=10)
            lows = [sc["phases"][phase]["arms"].get(a, {}).get("ratio_ci_low") for sc in entries for a in arms]
            highs = [sc["phases"][phase]["arms"].get(a, {}).get("ratio_ci_high") for sc in entries for a in arms]
            lows = [v for v in lows if isinstance(v, (int, float))] + [0.99]
            highs = [v for v in highs if isinstance(v, (int, float))] + [1.03]
            ax.set_ylim(max(0.0, min(lows) - 0.02), min(max(highs) + 0.02, 3.0))
            ax.legend(fontsize=7, loc="upper left")
    m = doc["machine"]
    fig.suptitle(f"{r['model']} {r['dtype']} (protocol {r['config'].get('protocol', 'attach')}): steered/vanilla, "
                 f"median of paired ratios with 95% CI "
                 f"({m.get('cpu_model')}, {m.get('torch_threads')} threads"
                 f"{', GPU ' + m['gpu']['name'] if m.get('gpu') else ''})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_parity_layers(doc: dict, path: Path) -> Path | None:
    """Per-layer max |layer.out − reference| / max |reference layer.out| of every arm, fp32 rows, one panel per
    plan (the relative error: models like SmolLM2 carry residual dims of ~1e4 where one ulp is large)."""
    r = doc["result"]
    rows = [x for x in r["rows"] if x.get("layer_rel_err") and x["dtype"] == "fp32"]
    if not rows:
        return None
    model = "tiny-llama" if any(x["model"] == "tiny-llama" for x in rows) else rows[0]["model"]
    rows = [x for x in rows if x["model"] == model]
    plans = [p for p in ("blend+gains", "additive", "affine", "per-row") if any(x["plan"] == p for x in rows)]
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(plans), figsize=(4.6 * len(plans), 3.6), squeeze=False)
    markers = {"torch": "o", "triton": "s", "fold": "^", "auto": "v", "steering-vectors": "x", "repeng": "+"}
    for ax, plan in zip(axes[0], plans):
        for x in [x for x in rows if x["plan"] == plan]:
            err = [max(e, ZERO_FLOOR) for e in x["layer_rel_err"]]
            ax.plot(range(len(err)), err, marker=markers.get(x["arm"], "."), ms=4, lw=1, label=x["arm"])
        ax.set_yscale("log")
        ax.set_ylim(ZERO_FLOOR / 3, 1e-4)
        ax.axhline(2 ** -23, color="#888", lw=0.8, ls=":")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{plan}", fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel("max|Δ layer.out| / max|ref layer.out|")
        ax.legend(fontsize=7)
    fig.suptitle(f"{model} fp32: per-layer parity vs the reference hooks, relative to the layer's largest "
                 f"activation (bit-exact layers drawn at {ZERO_FLOOR:g}; dotted: fp32 epsilon 2^-23)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
