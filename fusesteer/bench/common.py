"""Shared pieces of the bench suites: machine info, models, plans, prompts and the arms (our backends, the
bare torch hook, the peers) as context-manager factories.

An *arm* is a zero-argument callable returning a context manager that sets the arm up on the model and tears
it down on exit (or None: the unmodified model). The timing and the parity runs only ever see arms, so every
arm is applied the same way.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata as _metadata
from pathlib import Path
from typing import Callable

import torch

import fusesteer as fs
from fusesteer import testing
from fusesteer.runtime.backends.base import model_device

from . import paths
from .errors import BenchError
from .interpreter import INTERPRETER_AT_IMPORT

TINY_FAMILIES = testing.TINY_FAMILIES
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OUR_BACKENDS = ("torch", "triton", "fold", "auto")
PEERS = ("steering-vectors", "repeng")


# --------------------------------------------------------------------------------------------------
# machine and versions
# --------------------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return _metadata.version(dist)
    except _metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The commit of the checkout this fusesteer was imported from; None for an installed copy (never the commit
    of some other repository that happens to hold the site-packages folder)."""
    repo = paths.package_checkout()
    if repo is None:
        return None
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device: torch.device) -> dict:
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": load_average(),
        "device": str(device),
        "gpu": None,
        # torch: the running build's own version, with its local tag (+cpu, +cu132): a CUDA wheel's
        # distribution metadata leaves the tag out
        "versions": {"torch": torch.__version__, **{name: _version(dist) for name, dist in (
            ("triton", "triton"), ("transformers", "transformers"),
            ("bitsandbytes", "bitsandbytes"), ("numpy", "numpy"), ("fusesteer", "fusesteer"),
            ("steering-vectors", "steering-vectors"), ("repeng", "repeng"))}},
        "fusesteer_commit": _git_commit(),
    }
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            info["cgroup_cpu_max"] = f.read().strip()
    except OSError:
        pass
    if torch.cuda.is_available():
        idx = device.index if device.type == "cuda" and device.index is not None else 0
        p = torch.cuda.get_device_properties(idx)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                       "memory_gb": round(p.total_memory / 2 ** 30, 1), "count": torch.cuda.device_count(),
                       "cuda": torch.version.cuda}
    return info


def peer_versions() -> dict:
    return {p: _version(p) for p in PEERS}


# --------------------------------------------------------------------------------------------------
# models and prompts
# --------------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    model: object
    tokenizer: object | None
    label: str  # e.g. "tiny-llama", "smollm2-135m"
    family: str
    dtype: str  # fp32 / bf16 / fp16 / int8


def tiny_model(family: str, dtype: str = "fp32") -> Loaded:
    from fusesteer.testing import tiny

    if dtype == "int8":
        return tiny_int8(family)
    m = tiny(family, seed=0, dtype=DTYPES[dtype])
    return Loaded(m, None, f"tiny-{family}", family, dtype)


def tiny_int8(family: str) -> Loaded:
    """A tiny fp32 model saved and reloaded with bitsandbytes 8-bit linears (fp32 activations)."""
    from fusesteer.testing import tiny

    try:
        import bitsandbytes  # noqa: F401
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    except ImportError as e:
        raise BenchError(f"8-bit parity needs bitsandbytes ({e}); pip install bitsandbytes") from None
    from fusesteer.models import _quiet_transformers, _silence_bnb_cast_warning

    _silence_bnb_cast_warning()
    with tempfile.TemporaryDirectory(prefix="fusesteer-bench-int8-") as d, _quiet_transformers(False):
        tiny(family, seed=0).save_pretrained(d)
        m = AutoModelForCausalLM.from_pretrained(d, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                 dtype=torch.float32).eval()
    return Loaded(m, None, f"tiny-{family}", family, "int8")


def real_model(name: str, dtype: str, device: torch.device) -> Loaded:
    from fusesteer import models

    if dtype == "int8":
        m, tok = models.load(name, dtype=torch.float32, quantization="8bit", device=device, progress=False)
    else:
        m, tok = models.load(name, dtype=DTYPES[dtype], device=device, progress=False)
    return Loaded(m, tok, name, m.config.model_type, dtype)


def prompt_ids(loaded: Loaded, batch: int, length: int, device, seed: int = 0) -> torch.Tensor:
    """[batch, length] token ids without padding: real text (vendored questions) when a tokenizer is known,
    otherwise random ids (tiny models)."""
    m, tok = loaded.model, loaded.tokenizer
    if tok is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, m.config.vocab_size, (batch, length), generator=g).to(device)
    from fusesteer.evaluate.tasks import load_dataset

    qs = [r["question"] for r in load_dataset("strategyqa")]
    rows, i = [], seed * 7
    for _ in range(batch):
        toks: list[int] = []
        while len(toks) < length:
            toks += tok(f"Question: {qs[i % len(qs)]}\nAnswer:", add_special_tokens=False)["input_ids"]
            i += 1
        rows.append(toks[:length])
    return torch.tensor(rows, dtype=torch.long, device=device)


# --------------------------------------------------------------------------------------------------
# plans
# --------------------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def additive_vectors(spec: fs.ModelSpec, seed: int = 0, scale: float = 0.25) -> dict[int, torch.Tensor]:
    """One fp32 vector per layer for ``layer.out`` (b = α·γ·Δ_l-like: α·γ = scale, Δ_l ~ N(0, 1))."""
    g = _gen(seed)
    return {l: scale * torch.randn(spec.hidden_size, generator=g) for l in range(spec.num_layers)}


def additive_plan(model, seed: int = 0, scale: float = 0.25) -> fs.SteeringPlan:
    """All-layer additive ``layer.out`` vectors: the plan the peers can express."""
    plan = fs.SteeringPlan.for_model(model, name="additive")
    for l, v in additive_vectors(plan.spec, seed, scale).items():
        plan.add(layer=l, site="layer.out", b=v)
    return plan


def blend_gains_plan(model, seed: int = 0, k: int = 100, scale: float = 0.25,
                     gain_sites=("attn.o_proj.in", "mlp.down_proj.in")) -> fs.SteeringPlan:
    """Fusion-Steering-like all-layer ``layer.out`` blend (a = 1, b = α·γ·Δ_l) plus AUSteer-like gains:
    for each site in ``gain_sites``, ``k`` units chosen at random over all layers get a = 1 + γ with
    γ ∈ [-0.5, 1.5) (capped at half the site's units on small models)."""
    plan = additive_plan(model, seed=seed, scale=scale)
    plan.name = "blend+gains"
    spec, g = plan.spec, _gen(seed + 1000)
    have = fs.model_sites(model)  # Qwen3-MoE: no mlp.down_proj.in on sparse layers
    for site in gain_sites:
        w = spec.site_width(site)
        n = spec.num_layers * w
        kk = min(k, n // 2)
        units = torch.randperm(n, generator=g)[:kk]
        gains = 1.0 + (torch.rand(kk, generator=g) * 2.0 - 0.5)
        for l in range(spec.num_layers):
            sel = (units // w) == l
            if bool(sel.any()) and site in have[l]:
                plan.add(layer=l, site=site, a=gains[sel], dims=units[sel] % w)
    return plan


def affine_plan(model, seed: int = 0, scale: float = 0.5) -> fs.SteeringPlan:
    """Dense random (a, b) at every site of every layer (the tests' ``random_plan``)."""
    plan = fs.SteeringPlan.for_model(model, name="affine")
    spec, g = plan.spec, _gen(seed)
    have = fs.model_sites(model)
    for l in range(spec.num_layers):
        for site in fs.SITES:
            if site not in have[l]:
                continue
            w = spec.site_width(site)
            plan.add(layer=l, site=site, a=1 + scale * (torch.rand(w, generator=g) - 0.5),
                     b=scale * torch.randn(w, generator=g))
    return plan


def per_row_plans(model, n: int, seed: int = 0, k: int = 100, scale: float = 0.25) -> dict[str, fs.SteeringPlan]:
    """``n`` different blend+gains plans (one per batch row)."""
    return {f"row{i}": blend_gains_plan(model, seed=seed + 17 * (i + 1), k=k, scale=scale) for i in range(n)}


def plan_vectors(plan: fs.SteeringPlan) -> dict[int, torch.Tensor]:
    """{layer: b} of an additive-only layer.out plan (what the peers get)."""
    out = {}
    for e in plan.entries:
        if e.site != "layer.out" or e.a is not None or e.dims is not None or e.gating != "all":
            raise BenchError(f"plan {plan.name!r} is not additive-only at layer.out: {e.describe()}")
        out[e.layer] = e.b if e.layer not in out else out[e.layer] + e.b
    return out


# --------------------------------------------------------------------------------------------------
# arms
# --------------------------------------------------------------------------------------------------
def triton_usable(device: torch.device) -> tuple[bool, str]:
    """(can run, why not). On CPU the kernels run through the Triton interpreter."""
    try:
        importlib.import_module("triton")
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    if device.type == "cuda":
        return True, ""
    from fusesteer.kernels import interpreter_enabled

    if not (INTERPRETER_AT_IMPORT and interpreter_enabled()):
        return False, ("the Triton interpreter was not on when Triton was imported; run with TRITON_INTERPRET=1 "
                       "set in the environment to check the triton backend on CPU")
    return True, "CPU: Triton interpreter (TRITON_INTERPRET=1)"


def fusesteer_arm(model, plan, backend: str, rows=None, check_finite: bool = True) -> Callable[[], object]:
    """Our backends. ``plan``: a SteeringPlan or {name: plan}; ``rows``: per-row routing (plan names);
    ``check_finite``: passed to :func:`fusesteer.attach` (its one-time first-forward NaN/Inf check)."""
    def factory():
        return _fusesteer_ctx(model, plan, backend, rows, check_finite)
    return factory


@contextlib.contextmanager
def _fusesteer_ctx(model, plan, backend, rows, check_finite=True):
    stack = contextlib.ExitStack()
    with stack:
        if backend == "triton":
            from fusesteer.kernels import kernel_mode

            stack.enter_context(kernel_mode("triton"))  # the kernels themselves, never the torch fallback
        # timing arms attach around every timed step: skip the first-forward NaN/Inf check (one isfinite + host
        # sync per steered site), which would otherwise run on every timed step (parity compares logits directly)
        h = stack.enter_context(fs.attach(model, plan, backend=backend, check_finite=False))
        if rows is not None:
            h.route(rows)
        yield h


def _untuple_add(out, v):
    if isinstance(out, tuple):
        return (out[0] + v,) + tuple(out[1:])
    return out + v


def hook_arm(model, vectors: dict[int, torch.Tensor]) -> Callable[[], object]:
    """A bare torch forward hook per layer returning ``out + v`` (v pre-cast to the model's dtype/device)."""
    from fusesteer.runtime.families import model_parts

    layers = model_parts(model).layers
    dev = model_device(model)
    dt = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    if dt not in DTYPES.values():
        dt = torch.float32
    vecs = {l: v.to(dev, dt) for l, v in vectors.items()}

    @contextlib.contextmanager
    def ctx():
        hs = [layers[l].register_forward_hook(lambda m, a, o, v=v: _untuple_add(o, v)) for l, v in vecs.items()]
        try:
            yield
        finally:
            for h in hs:
                h.remove()
    return ctx


def peer_available(name: str) -> tuple[bool, str]:
    if name == "steering-vectors":
        try:
            importlib.import_module("steering_vectors")
        except ImportError as e:
            return False, f"steering-vectors is not installed ({e}); pip install --no-deps steering-vectors"
        return True, ""
    if name == "repeng":
        try:
            from fusesteer.interop.peers import import_repeng

            import_repeng()
        except ImportError as e:
            return False, str(e)
        return True, ""
    raise BenchError(f"unknown peer {name!r}")


def steering_vectors_arm(model, vectors: dict[int, torch.Tensor]) -> Callable[[], object]:
    """steering-vectors: ``SteeringVector(layer_activations={l: v}, layer_type="decoder_block").apply(model)``
    (a forward hook per layer adding the fp32 vector to the layer output in place)."""
    from steering_vectors import SteeringVector

    dev = model_device(model)
    sv = SteeringVector(layer_activations={l: v.to(dev) for l, v in vectors.items()}, layer_type="decoder_block")

    def factory():
        return sv.apply(model)
    return factory


def repeng_arm(model, vectors: dict[int, torch.Tensor]) -> Callable[[], object]:
    """repeng: ``ControlModel(model, layers)`` + ``set_control(ControlVector(...), 1.0)``; unwrapped on exit.
    At batch > 1 its forward needs ``position_ids`` of shape (B, T) (the callers pass them)."""
    from fusesteer.interop.peers import import_repeng

    repeng = import_repeng()
    cv = repeng.ControlVector(model_type=model.config.model_type,
                              directions={l: v.numpy() for l, v in vectors.items()})
    layer_ids = sorted(vectors)

    @contextlib.contextmanager
    def ctx():
        cm = repeng.ControlModel(model, layer_ids)
        try:
            cm.set_control(cv, 1.0)
            yield cm
        finally:
            cm.reset()
            cm.unwrap()
    return ctx


def peer_arm(name: str, model, vectors) -> Callable[[], object]:
    if name == "steering-vectors":
        return steering_vectors_arm(model, vectors)
    if name == "repeng":
        return repeng_arm(model, vectors)
    raise BenchError(f"unknown peer {name!r}")
