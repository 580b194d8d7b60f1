"""Parity suite: every backend (and the peers, on the additive plan) against the ``reference`` hooks.

For each model, dtype and plan the reference run prefills a prompt batch and then decodes ``steps`` tokens
greedily on its KV cache. Every other arm runs the same prompt and is *teacher-forced* with the reference's
tokens, so each of its decode steps sees exactly the reference's context and its logits can be compared
step by step (not only until the first divergence). Reported per (model, dtype, plan, arm):

* ``max_abs``: max |logit - reference logit| over all prefill positions and decode steps;
* ``kl_max`` / ``kl_mean``: KL(reference || arm) of the next-token distributions over the same positions;
* ``agree``: share of the decode steps (× batch rows) whose greedy token equals the reference's;
* ``layer_err``: per layer, max |layer.out - reference layer.out| over the prompt (captured with
  :func:`fusesteer.methods.capture.site_recorder`);
* ``layer_rel_err``: the same divided by the layer's max |reference activation|;
* ``effect``: max |reference - unsteered| prefill logit (a plan that does nothing would make the
  comparison vacuous, which fails the gate);
* at bf16 / fp16 / int8, ``vs_fp32`` and ``ref_vs_fp32``: max |prefill logit - fp32 reference prefill logit|
  of the arm and of the reference at that dtype (is the arm further from the fp32 result than the
  reference's own rounding puts it?). Informational; the gate uses the tests' thresholds.

The gate (:mod:`fusesteer.tolerances`, the tests' thresholds) fails on any ``FAIL``, ``ERROR`` or ``vacuous``
row. ``n/a`` rows are arms that refuse the plan by design (e.g. ``fold`` with per-row plans), ``skipped``
rows could not run here (with the reason).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from fusesteer.errors import AttachError, ContractError, FuseSteerError
from fusesteer.methods.capture import site_recorder
from fusesteer.runtime.compat import output_cache, with_cache

from .. import tolerances as TH
from . import common as C

PLAN_KINDS = ("affine", "blend+gains", "additive", "per-row")
GATED_BAD = ("FAIL", "ERROR", "vacuous")


@dataclass
class Run:
    prefill: torch.Tensor  # [B, T, V] fp32 logits
    steps: torch.Tensor  # [B, N, V] fp32 logits of the N greedy predictions (prefill's last + N-1 decodes)
    preds: torch.Tensor  # [B, N] argmax of each of those
    layers: dict = field(default_factory=dict)  # {layer: [B, T, W] fp32 layer.out over the prompt}


def run_arm(model, arm, ids: torch.Tensor, n_steps: int, forced: torch.Tensor | None = None,
            record_layers: bool = True) -> Run:
    """Prefill ``ids`` and decode ``n_steps - 1`` tokens on the KV cache under ``arm`` (None = unmodified).

    ``forced``: [B, N] tokens to feed (teacher forcing); default: the run's own greedy tokens.
    Position ids are passed explicitly ([B, T]) so every arm, repeng included, works at batch > 1.
    Runs under ``torch.no_grad()``, as ``generate()`` does; :func:`inference_mode_check` covers
    ``torch.inference_mode()``.
    """
    B, T = ids.shape
    dev = ids.device
    ctx = arm() if arm is not None else None
    with torch.no_grad(), (ctx if ctx is not None else _null()):
        with _layer_recorder(model, record_layers) as store:
            out = model(input_ids=ids, position_ids=torch.arange(T, device=dev).expand(B, T), use_cache=True)
        layers = {l: t.float().cpu().clone() for l, t in store.items()}
        prefill = out.logits.float().cpu()
        cache = output_cache(out)
        logits = [out.logits[:, -1].float().cpu()]
        for t in range(1, n_steps):
            prev = forced[:, t - 1] if forced is not None else logits[-1].argmax(-1)
            pos = torch.full((B, 1), T + t - 1, device=dev, dtype=torch.long)
            out = model(input_ids=prev.to(dev)[:, None], position_ids=pos, use_cache=True, **with_cache(model, cache))
            logits.append(out.logits[:, -1].float().cpu())
    steps = torch.stack(logits, 1)
    return Run(prefill, steps, steps.argmax(-1), layers)


@contextlib.contextmanager
def _layer_recorder(model, enabled: bool):
    """layer.out of every layer: :func:`site_recorder`, or, when a peer has replaced the decoder layers by
    wrappers (repeng's ControlModule, which site_recorder rightly refuses as not a decoder layer), forward
    hooks on whatever modules now sit in ``model.model.layers`` (the wrappers' outputs include the control)."""
    if not enabled:
        yield {}
        return
    try:
        rec = site_recorder(model, "layer.out")
        store = rec.__enter__()
    except FuseSteerError:
        rec = None
    if rec is not None:
        try:
            yield store
        finally:
            rec.__exit__(None, None, None)
        return
    store, hooks = {}, []
    for l, layer in enumerate(model.model.layers):
        def hook(mod, args, out, l=l):
            store[l] = (out[0] if isinstance(out, tuple) else out).detach()
        hooks.append(layer.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


class _null:
    def __init__(self, value=None):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return False


def inference_mode_check(model, arm, ids: torch.Tensor, want: torch.Tensor) -> str | None:
    """One prefill under ``torch.inference_mode()`` (what serving code and our timing use): None if it runs
    and gives the same logits as under no_grad (bit for bit), else what went wrong."""
    B, T = ids.shape
    try:
        with torch.inference_mode(), arm():
            got = model(input_ids=ids, position_ids=torch.arange(T, device=ids.device).expand(B, T)).logits
    except Exception as e:  # noqa: BLE001
        return f"fails under torch.inference_mode(): {type(e).__name__}: {e}"
    got = got.float().cpu()
    if not torch.equal(got, want):
        return (f"under torch.inference_mode() the logits differ from no_grad by "
                f"{(got - want).abs().max().item():.3g}")
    return None


def _kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) per position, from logits [..., V]."""
    lp = torch.log_softmax(ref_logits.double(), -1)
    lq = torch.log_softmax(logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


def compare(ref: Run, run: Run) -> dict:
    d_pre = (run.prefill - ref.prefill).abs().max().item()
    d_steps = (run.steps - ref.steps).abs().max().item()
    kl = torch.cat([_kl(ref.prefill, run.prefill).flatten(), _kl(ref.steps, run.steps).flatten()])
    keys = [l for l in sorted(ref.layers) if l in run.layers]
    layer_err = [(run.layers[l] - ref.layers[l]).abs().max().item() for l in keys]
    layer_scale = [ref.layers[l].abs().max().item() for l in keys]
    return {
        "max_abs": max(d_pre, d_steps),
        "max_abs_prefill": d_pre,
        "max_abs_decode": d_steps,
        "kl_max": kl.max().item(),
        "kl_mean": kl.mean().item(),
        "agree": (run.preds == ref.preds).float().mean().item(),
        "layer_err": layer_err,
        # relative to the layer's largest activation (SmolLM2-like models carry "massive" residual dims of
        # ~1e4, where one fp32 ulp is ~1e-3 and one bf16 ulp ~1e2)
        "layer_rel_err": [e / s if s > 0 else 0.0 for e, s in zip(layer_err, layer_scale)],
    }


def judge(metrics: dict, dtype: str, backend: str, ref_absmax: float) -> tuple[str, str]:
    tol = TH.logit_tolerance(dtype, backend, ref_absmax)
    metrics["tol"] = tol
    why = []
    if not metrics["max_abs"] <= tol:  # NaN fails too
        why.append(f"max|Δlogit| {metrics['max_abs']:.3g} > {tol:.3g}")
    if TH.tokens_must_agree(dtype) and metrics["agree"] < 1.0:
        why.append(f"greedy tokens agree on {metrics['agree']:.1%} of steps (must be 100% at {dtype})")
    return ("FAIL", "; ".join(why)) if why else ("pass", "")


# --------------------------------------------------------------------------------------------------
# the suite
# --------------------------------------------------------------------------------------------------
@dataclass
class ParityConfig:
    quick: bool = True
    model: str = "smollm2-135m"
    device: str = "cpu"
    families: tuple = C.TINY_FAMILIES
    dtypes: tuple = ("fp32", "bf16", "fp16", "int8")
    plans: tuple = PLAN_KINDS
    arms: tuple = C.OUR_BACKENDS + C.PEERS
    steps: int | None = None
    batch: int = 2
    length: int | None = None
    seed: int = 0
    all_triton: bool = False
    log: object = print


# quick mode (CI, tiny models): which (family, dtype) pairs and plans run, and which rows the Triton
# interpreter (~1 s per tiny forward) covers. --all-triton lifts the Triton limit.
QUICK_FAMILIES = {"fp32": C.TINY_FAMILIES, "bf16": C.TINY_FAMILIES, "fp16": ("llama", "gemma3"),
                  "int8": ("llama", "gemma3")}
QUICK_PLANS = {"fp32": PLAN_KINDS, "bf16": ("affine", "additive"), "fp16": ("affine", "additive"),
               "int8": ("affine", "additive")}
QUICK_TRITON = {("llama", "fp32", "affine"), ("gemma2", "fp32", "affine"), ("gemma3", "fp32", "affine"),
                ("qwen3", "fp32", "affine"), ("llama", "fp32", "per-row"), ("gemma3", "bf16", "affine"),
                ("llama", "fp16", "affine"), ("llama", "int8", "affine")}


def _matrix(cfg: ParityConfig) -> list[tuple[str, str]]:
    """(model name or tiny family, dtype) pairs to run."""
    if cfg.quick:
        return [(f, dt) for dt in cfg.dtypes for f in QUICK_FAMILIES.get(dt, ()) if f in cfg.families]
    return [(cfg.model, dt) for dt in cfg.dtypes]


def _plans_for(cfg: ParityConfig, dtype: str) -> list[str]:
    want = QUICK_PLANS.get(dtype, PLAN_KINDS) if cfg.quick else PLAN_KINDS
    return [p for p in want if p in cfg.plans]


def _triton_here(cfg: ParityConfig, loaded: C.Loaded, dtype: str, plan: str, device) -> tuple[bool, str]:
    ok, why = C.triton_usable(device)
    if not ok:
        return False, why
    if device.type == "cpu" and not loaded.label.startswith("tiny-"):
        return False, ("Triton on CPU runs only through the interpreter (~1000x slower than compiled code): tiny "
                       "shapes only; run the bench on a CUDA machine for the real model")
    return True, why


def _quick_limited(cfg: ParityConfig, loaded: C.Loaded, dtype: str, plan: str, device) -> bool:
    """Quick mode on CPU runs the Triton interpreter only on the QUICK_TRITON rows (no row for the others)."""
    return (device.type == "cpu" and cfg.quick and not cfg.all_triton
            and (loaded.family, dtype, plan) not in QUICK_TRITON)


def _build_plan(kind: str, model, seed: int, batch: int):
    """(plan or {name: plan}, rows or None)."""
    if kind == "affine":  # the same plan at every dtype (rows are also compared with the fp32 run)
        return C.affine_plan(model, seed=seed, scale=0.3), None
    if kind == "blend+gains":
        return C.blend_gains_plan(model, seed=seed), None
    if kind == "additive":
        return C.additive_plan(model, seed=seed), None
    if kind == "per-row":
        plans = C.per_row_plans(model, batch, seed=seed)
        return plans, list(plans)
    raise C.BenchError(f"unknown plan kind {kind!r}")


def _load(cfg: ParityConfig, name: str, dtype: str, device) -> C.Loaded:
    if cfg.quick:
        loaded = C.tiny_model(name, dtype)
        if dtype != "int8":
            loaded.model.to(device)
        return loaded
    return C.real_model(name, dtype, device)


def run_parity(cfg: ParityConfig) -> dict:
    """Run the parity matrix; returns {"rows": [...], "ok": bool, ...} (see module docstring)."""
    device = torch.device(cfg.device)
    steps = cfg.steps or (4 if cfg.quick else 16)
    length = cfg.length or (4 if cfg.quick else 24)
    rows: list[dict] = []
    log = cfg.log
    fp32_ref: dict = {}  # (model, plan) -> fp32 reference prefill logits, to place lower precisions
    t_start = time.perf_counter()
    for name, dtype in _matrix(cfg):
        try:
            loaded = _load(cfg, name, dtype, device)
        except Exception as e:  # noqa: BLE001 - one row saying why, the rest of the matrix still runs
            rows.append(dict(model=name, family=name, dtype=dtype, plan="-", arm="-", status="skipped",
                             reason=f"could not load: {type(e).__name__}: {e}"))
            log(f"  {name:16s} {dtype:5s} skipped: could not load ({type(e).__name__}: {e})")
            continue
        model = loaded.model
        ids = C.prompt_ids(loaded, cfg.batch, length, C.model_device(model), seed=cfg.seed)
        vanilla = run_arm(model, None, ids, 1, record_layers=False)
        for kind in _plans_for(cfg, dtype):
            plan, route = _build_plan(kind, model, cfg.seed, cfg.batch)
            base = dict(model=loaded.label, family=loaded.family, dtype=dtype, plan=kind, batch=cfg.batch,
                        prompt_len=length, steps=steps)
            try:
                ref = run_arm(model, C.fusesteer_arm(model, plan, "reference", route), ids, steps)
            except Exception as e:  # noqa: BLE001
                rows.append(dict(base, arm="reference", status="ERROR", reason=f"{type(e).__name__}: {e}"))
                log(f"  {loaded.label:16s} {dtype:5s} {kind:12s} reference ERROR {type(e).__name__}: {e}")
                continue
            ref_absmax = max(ref.prefill.abs().max().item(), ref.steps.abs().max().item())
            effect = (ref.prefill - vanilla.prefill).abs().max().item()
            base.update(ref_absmax=ref_absmax, effect=effect)
            truth = fp32_ref.get((loaded.label, kind))
            if dtype == "fp32":
                fp32_ref[(loaded.label, kind)] = ref.prefill
            elif truth is not None:
                base["ref_vs_fp32"] = (ref.prefill - truth).abs().max().item()
            arms = [a for a in C.OUR_BACKENDS if a in cfg.arms]
            if kind == "additive":
                arms += [p for p in C.PEERS if p in cfg.arms]
            for arm in arms:
                if arm == "triton" and _quick_limited(cfg, loaded, dtype, kind, device):
                    continue
                row = dict(base, arm=arm)
                row.update(_one(cfg, loaded, arm, kind, plan, route, ids, steps, ref, dtype, device, ref_absmax,
                                effect, truth if dtype != "fp32" else None))
                rows.append(row)
                log(_fmt_row(row))
    ok = not any(r["status"] in GATED_BAD for r in rows)
    return {
        "suite": "parity",
        "mode": "quick" if cfg.quick else "full",
        "ok": ok,
        "n_rows": len(rows),
        "counts": {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})},
        "thresholds": TH.describe(),
        "peers": C.peer_versions(),
        "seconds": round(time.perf_counter() - t_start, 1),
        "config": {"steps": steps, "prompt_len": length, "batch": cfg.batch, "seed": cfg.seed,
                   "triton_quick_rows": (sorted("/".join(k) for k in QUICK_TRITON)
                                         if cfg.quick and not cfg.all_triton and device.type == "cpu" else "all"),
                   "dtypes": list(cfg.dtypes), "plans": list(cfg.plans), "arms": list(cfg.arms),
                   "models": sorted({r["model"] for r in rows})},
        "rows": rows,
    }


def _one(cfg, loaded, arm, plan_kind, plan, route, ids, steps, ref, dtype, device, ref_absmax, effect,
         truth=None) -> dict:
    model = loaded.model
    t0 = time.perf_counter()
    if arm in C.PEERS:
        ok, why = C.peer_available(arm)
        if not ok:
            return dict(status="skipped", reason=why)
        try:
            factory = C.peer_arm(arm, model, C.plan_vectors(plan))
            run = run_arm(model, factory, ids, steps, forced=ref.preds)
        except Exception as e:  # noqa: BLE001 - a peer that cannot run this model is reported, not gated
            return dict(status="n/a", reason=f"peer failed on this model: {type(e).__name__}: {e}"[:300])
        backend_for_tol = "torch"
        problem = None
    else:
        if arm == "triton":
            ok, why = _triton_here(cfg, loaded, dtype, plan_kind, device)
            if not ok:
                return dict(status="skipped", reason=why)
        factory = C.fusesteer_arm(model, plan, arm, route)
        try:
            run = run_arm(model, factory, ids, steps, forced=ref.preds)
        except ContractError as e:  # the backend does not reproduce the model: a regression, not "not applicable"
            return dict(status="FAIL", reason=str(e)[:300])
        except AttachError as e:
            return dict(status="n/a", reason=str(e)[:300])
        except Exception as e:  # noqa: BLE001 - an unexpected crash fails the gate
            return dict(status="ERROR", reason=f"{type(e).__name__}: {e}"[:500])
        problem = inference_mode_check(model, factory, ids, run.prefill)
        backend_for_tol = arm
    m = compare(ref, run)
    if truth is not None:  # prefill distance to the fp32 reference (same weights, same plan, same prompt)
        m["vs_fp32"] = (run.prefill - truth).abs().max().item()
    status, reason = judge(m, dtype, backend_for_tol, ref_absmax)
    if status == "pass" and not effect > TH.MIN_EFFECT:
        status, reason = "vacuous", f"the plan moved the reference logits by only {effect:.2g}"
    if problem is not None:
        status, reason = "ERROR", "; ".join(x for x in (problem[:400], reason) if x)
    return dict(m, status=status, reason=reason, seconds=round(time.perf_counter() - t0, 2))


def _fmt_row(r: dict) -> str:
    head = f"  {r['model']:16s} {r['dtype']:5s} {r['plan']:12s} {r['arm']:17s}"
    if "max_abs" not in r:
        return f"{head} {r['status']}: {r.get('reason', '')[:110]}"
    return (f"{head} {r['status']:7s} max|Δ| {r['max_abs']:.2e} (tol {r['tol']:.1e})  KL {r['kl_max']:.1e}  "
            f"agree {r['agree']:.0%}" + (f"  <- {r['reason']}" if r.get("reason") else ""))
