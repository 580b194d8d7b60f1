"""`fusesteer plan show FILE` and `fusesteer plan convert IN OUT` (fusesteer .safetensors <-> GGUF)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from ..errors import FuseSteerError, ModelLoadError, PlanError

PLAN_EXTS = (".safetensors",)
GGUF_EXTS = (".gguf",)


# --------------------------------------------------------------------------------------------------
# shared helpers (also used by `fusesteer generate`)


def file_kind(path: str) -> str:
    ext = os.path.splitext(str(path))[1].lower()
    if ext in GGUF_EXTS:
        return "gguf"
    if ext in PLAN_EXTS:
        return "plan"
    raise FuseSteerError(f"{path}: unknown plan file type {ext or '(no extension)'!r}; use .safetensors for "
                         "fusesteer plans or .gguf for control vectors")


def model_spec(name_or_path: str):
    """The ModelSpec of an embedded model name or a local HF folder, reading only its config when possible."""
    from transformers import AutoConfig

    from .. import models
    from ..runtime.plan import ModelSpec

    folder = None
    if name_or_path in models.KNOWN:
        if models.cache_marker(name_or_path) is not None:
            folder = models.cache_path(name_or_path)
        else:  # not converted yet: load (converts once, then the config is on disk)
            model, _tok = models.load(name_or_path)
            return ModelSpec.from_model(model)
    else:
        folder = Path(name_or_path).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"unknown model {name_or_path!r}: not a known name "
                                 f"({', '.join(sorted(models.KNOWN))}) "
                                 "and not a local Hugging Face model folder with a config.json")
    try:
        cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        return ModelSpec.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - one clear message
        raise ModelLoadError(f"could not read the model shape from {folder}: {type(e).__name__}: {e}") from None


def parse_spec(value: str):
    """--spec: a ModelSpec as inline JSON, a .json file, or a fusesteer plan file (its bound model)."""
    from ..runtime.plan import ModelSpec, SteeringPlan

    text = value.strip()
    if text.startswith("{"):
        try:
            return ModelSpec.from_dict(json.loads(text), where="--spec")
        except json.JSONDecodeError as e:
            raise PlanError(f"--spec: not valid JSON ({e})") from None
    if not os.path.isfile(value):
        raise PlanError(f"--spec {value!r}: not a file and not inline JSON; give a ModelSpec JSON "
                        "('{\"model_type\": ..., \"num_layers\": ..., ...}'), a .json file or a fusesteer plan file")
    if value.lower().endswith(".json"):
        try:
            with open(value) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"--spec {value}: cannot read JSON ({e})") from None
        if isinstance(d, dict) and isinstance(d.get("model"), dict):  # a plan header dump
            d = d["model"]
        return ModelSpec.from_dict(d, where=f"--spec {value}")
    plan = SteeringPlan.load(value)
    if plan.spec is None:
        raise PlanError(f"--spec {value}: that plan is not bound to a model, so it has no model shape to lend")
    return plan.spec


def resolve_spec(args):
    spec_arg, model_arg = getattr(args, "spec", None), getattr(args, "model", None)
    if spec_arg and model_arg:
        raise FuseSteerError("give either --model or --spec, not both")
    if spec_arg:
        return parse_spec(spec_arg)
    if model_arg:
        return model_spec(model_arg)
    return None


def filter_layers(plan, layer_range):
    """Keep only entries whose layer is in the INCLUSIVE range (a, b)."""
    from ..runtime.plan import SteeringPlan

    if layer_range is None:
        return plan
    lo, hi = layer_range
    if lo < 0 or hi < lo:
        raise PlanError(f"--layer-range {lo} {hi}: need 0 <= start <= end (inclusive, 0-based layers)")
    out = SteeringPlan(plan.spec, name=plan.name, notes=plan.notes,
                       metadata={**plan.metadata, "layer_range": [lo, hi]})
    out.entries = [e for e in plan.copy().entries if lo <= e.layer <= hi]
    if not out.entries and plan.entries:
        raise PlanError(f"--layer-range {lo} {hi} keeps none of the plan's entries (layers "
                        f"{sorted({e.layer for e in plan.entries})})")
    return out


def load_plan_file(path: str, spec=None, scale: float = 1.0, layer_range=None):
    """A fusesteer plan or a GGUF control vector, optionally bound to ``spec``, scaled and layer-filtered."""
    from ..interop.gguf_cv import read_control_vector
    from ..runtime.plan import SteeringPlan

    if file_kind(path) == "gguf":
        return read_control_vector(path, spec, scale=scale, layer_range=layer_range)
    plan = SteeringPlan.load(path)
    if spec is not None:
        plan.bind(spec)
    if scale != 1.0:
        plan = plan.scaled(scale)
    return filter_layers(plan, layer_range)


def _norm(t) -> float | None:
    # float64: the norm of float32 values near the float32 maximum does not overflow
    return None if t is None else float(t.double().norm())


def safe_text(v) -> str:
    """``v`` as text with every non-printable character (terminal escapes, newlines, bidi controls) escaped,
    for names and metadata that come from an untrusted file."""
    s = v if isinstance(v, str) else str(v)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)


def _finite_json(v):
    """A copy of a summary with non-finite floats (which JSON cannot hold) as strings: "inf", "-inf", "nan"."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite_json(x) for x in v]
    return v


def plan_summary(plan, path: str | None = None) -> dict:
    entries = []
    for i, e in enumerate(plan.entries):
        a = e.a
        entries.append({
            "index": i, "layer": e.layer, "site": e.site, "gating": e.gating,
            "dims": None if e.dims is None else int(e.dims.numel()),
            "a": None if a is None else (float(a) if a.dim() == 0 else
                                         {"norm": _norm(a), "min": float(a.min()), "max": float(a.max())}),
            "a_minus_1_norm": None if a is None else _norm(a - 1),
            "b_norm": _norm(e.b) if e.b is None or e.b.dim() == 1 else abs(float(e.b)),
            "b_scalar": e.b is not None and e.b.dim() == 0,
        })
    spec = plan.spec
    return {
        "file": path,
        "name": plan.name,
        "notes": plan.notes,
        "model": spec.to_dict() if spec else None,
        "fingerprint": spec.fingerprint() if spec else None,
        "entries": entries,
        "sites": sorted({e.site for e in plan.entries}),
        "layers": sorted({e.layer for e in plan.entries}),
        "gatings": sorted({e.gating for e in plan.entries}),
        "identity": plan.is_identity(),
        "metadata": plan.metadata,
    }


def _fmt(x, digits=4) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}"


def render_summary(s: dict) -> str:
    lines = []
    lines.append(f"plan:        {safe_text(s['name']) if s['name'] else '(unnamed)'}"
                 + (f"   [{safe_text(s['file'])}]" if s["file"] else ""))
    if s["notes"]:
        lines.append(f"notes:       {safe_text(s['notes'])}")
    if s["model"]:
        m = s["model"]
        lines.append(f"model:       {safe_text(m['model_type'])}  layers={m['num_layers']} hidden={m['hidden_size']} "
                     f"intermediate={m['intermediate_size']} attn_width={m['attn_width']}")
        lines.append(f"fingerprint: {s['fingerprint']}")
    else:
        lines.append("model:       unbound (no model shape; checked and bound when attached)")
        lines.append("fingerprint: none (unbound)")
    lines.append(f"entries:     {len(s['entries'])}   sites: {', '.join(s['sites']) or '-'}   "
                 f"layers: {_layers(s['layers'])}   gating: {', '.join(s['gatings']) or '-'}"
                 + ("   (identity)" if s["identity"] and s["entries"] else ""))
    if s["entries"]:
        head = f"  {'#':>4}  {'layer':>5}  {'site':<16} {'gating':<9} {'dims':>6}  {'a':<26} {'|a-1|':>9}  {'|b|':>9}"
        lines.append(head)
        for e in s["entries"]:
            a = e["a"]
            if a is None:
                a_txt = "1"
            elif isinstance(a, float):
                a_txt = f"scalar {a:.4g}"
            else:
                a_txt = f"|a|={a['norm']:.4g} [{a['min']:.3g}, {a['max']:.3g}]"
            b_txt = _fmt(e["b_norm"]) + (" (scalar)" if e["b_scalar"] else "")
            dims = "dense" if e["dims"] is None else str(e["dims"])
            lines.append(f"  {e['index']:>4}  {e['layer']:>5}  {e['site']:<16} {e['gating']:<9} {dims:>6}  "
                         f"{a_txt:<26} {_fmt(e['a_minus_1_norm']):>9}  {b_txt:>9}")
    if s["metadata"]:
        lines.append("metadata:")
        for k in sorted(s["metadata"]):
            v = json.dumps(s["metadata"][k], sort_keys=True, default=str)  # ASCII: escapes control characters
            if len(v) > 300:
                v = v[:297] + "..."
            lines.append(f"  {safe_text(k)}: {v}")
    return "\n".join(lines)


def _layers(layers) -> str:
    if not layers:
        return "-"
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(map(str, layers))


# --------------------------------------------------------------------------------------------------
# verbs


def _add_bind_args(p, what: str):
    g = p.add_argument_group("binding (a GGUF control vector holds no model shape)")
    g.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                   help=f"bind {what} to this model's shape "
                        "(embedded name or local HF folder; only its config is read)")
    g.add_argument("--spec", default=None, metavar="SPEC",
                   help="bind to a model shape given as inline JSON, a .json file, or a bound fusesteer plan file")



def _wrap(text: str) -> str:
    import textwrap

    return textwrap.fill(text, 96)


def register(sub, fmt):
    p = sub.add_parser("plan", formatter_class=fmt, help="inspect and convert plan files (.safetensors, .gguf)",
                       description=_wrap("Inspect steering plans and convert them between the fusesteer format "
                                   "(.safetensors) and GGUF control vectors (.gguf, llama.cpp / repeng)."),
                       epilog="examples:\n  fusesteer plan show plan.safetensors\n"
                              "  fusesteer plan convert happy.gguf happy.safetensors --model smollm2-135m")
    psub = p.add_subparsers(dest="plan_command", metavar="PLAN_COMMAND")
    psub.required = True

    s = psub.add_parser(
        "show", formatter_class=fmt, help="print a plan's entries, sites, layers, norms, metadata, fingerprint",
        description=_wrap("Print what a plan file does: its model shape and fingerprint, and for each entry the "
                    "layer, site, gating, number of dims (sparse) and the norms of a and b. Accepts fusesteer "
                    "plans (.safetensors) and GGUF control vectors (.gguf; direction.N = addition to layer N's "
                    "output)."),
        epilog="examples:\n  fusesteer plan show plan.safetensors\n"
               "  fusesteer plan show happy.gguf --model smollm2-135m --json")
    s.add_argument("file", help="a .safetensors plan or a .gguf control vector")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_bind_args(s, "a GGUF (or check a plan)")
    s.set_defaults(func=run_show)

    c = psub.add_parser(
        "convert", formatter_class=fmt, help="convert between fusesteer plans (.safetensors) and GGUF (.gguf)",
        description=_wrap("Convert by file extension: .safetensors (fusesteer plan) <-> .gguf (control vector). "
                    "GGUF export needs a plan of pure additions to 'layer.out' (a = 1, gating 'all'); the error "
                    "names the entry that blocks it. A GGUF imported without --model/--spec gives an unbound "
                    "plan (bound when attached)."),
        epilog="examples:\n  fusesteer plan convert caa.safetensors caa.gguf\n"
               "  fusesteer plan convert happy.gguf happy.safetensors --model smollm2-135m --scale 0.5 "
               "--layer-range 10 20")
    c.add_argument("input", metavar="IN", help="input file (.safetensors or .gguf)")
    c.add_argument("output", metavar="OUT", help="output file (.safetensors or .gguf)")
    c.add_argument("--scale", type=float, default=1.0,
                   help="multiply the input (GGUF: llama.cpp --control-vector-scaled strength; fusesteer plan: "
                        "b -> s*b, a -> 1 + s*(a - 1))")
    c.add_argument("--layer-range", type=int, nargs=2, metavar=("START", "END"), default=None,
                   help="keep only layers START..END, both inclusive (llama.cpp --control-vector-layer-range)")
    c.add_argument("--model-hint", default=None, help="GGUF output: controlvector.model_hint (default: the "
                                                       "plan's model_type)")
    c.add_argument("--allow-layer0", action="store_true",
                   help="GGUF output: write direction.0 (llama.cpp rejects it; repeng/fusesteer read it)")
    _add_bind_args(c, "the input")
    c.set_defaults(func=run_convert)


def run_show(args) -> int:
    spec = resolve_spec(args)
    plan = load_plan_file(args.file, spec)
    s = plan_summary(plan, args.file)
    s["format"] = "gguf-control-vector" if file_kind(args.file) == "gguf" else "fusesteer-plan"
    if args.json:
        print(json.dumps(_finite_json(s), indent=2, sort_keys=True, default=str, allow_nan=False))
    else:
        print(f"format:      {'GGUF control vector' if s['format'] == 'gguf-control-vector' else 'fusesteer plan'}")
        print(render_summary(s))
    return 0


def run_convert(args) -> int:
    from ..interop.gguf_cv import write_control_vector

    kin, kout = file_kind(args.input), file_kind(args.output)
    spec = resolve_spec(args)
    plan = load_plan_file(args.input, spec, scale=args.scale,
                          layer_range=tuple(args.layer_range) if args.layer_range else None)
    if os.path.abspath(args.input) == os.path.abspath(args.output) and kin == kout and \
            args.scale == 1.0 and not args.layer_range and spec is None:
        raise FuseSteerError("input and output are the same file and nothing would change")
    if kout == "gguf":
        write_control_vector(plan, args.output, model_hint=args.model_hint, allow_layer0=args.allow_layer0)
    else:
        plan.save(args.output)
    fp = plan.spec.fingerprint() if plan.spec else "unbound"
    print(f"wrote {args.output}: {len(plan.entries)} entries, layers {_layers(sorted({e.layer for e in plan.entries}))}"
          f", sites {', '.join(sorted({e.site for e in plan.entries})) or '-'}, model {fp}", file=sys.stdout)
    return 0
