"""Compile one kernel variant for an NVIDIA target without a GPU and read its facts (the worker of
``python -m bench.aot``; run as ``python -m bench.aot_compile`` with ``TRITON_INTERPRET=0``).

A *variant* is a dict: ``kernel`` (add_rmsnorm | glu | affine), ``dtype`` (fp32 | fp16 | bf16), ``arch``
(80 | 90 | 100), ``width``, ``map`` (none | uniform | per-row), ``family`` (llama | gemma: RMSNorm
convention and Gemma post-norm for add_rmsnorm, silu / gelu_tanh for glu; None for affine), and optionally
``inject`` (``spill``: launch with 1 warp; ``unaligned``: compile without the alignment / divisibility
specialization) and ``bf16_store`` (``bits``: the bf16 output written as int16 bit patterns rounded to
nearest-even in the kernel, the path the launch takes only under the Triton interpreter; used by the
bf16-store check, which compares it with the GPU path's ``.to(tl.bfloat16)`` store).

How a variant becomes a binary, exactly as a real launch would:

1. meta tensors shaped like the tensors the ``triton`` backend passes (contiguous [M, W] rows, [W] norm
   weights, float32 [S, W] plan tables with S = 1 for a uniform map and 1 + 2 x 8 for 8 per-row plans, an int32
   slot per row) go through the kernel file's own ``*_launch`` function: the BLOCK sizes, constexprs, num_warps
   and argument dtypes come from there, never from here;
2. Triton's own argument binder for the target (``create_function_from_signature`` + ``_pack_args``, what
   ``JITFunction.run`` calls) turns the arguments into the signature, the constexprs and the attributes a
   launch gets: 16-byte aligned pointers (meta tensors report address 0, as the CUDA caching allocator's
   blocks are 512-byte aligned) and integers divisible by 16 get ``tt.divisibility = 16``, an integer equal
   to 1 becomes a constexpr (the uniform map's S = 1);
3. ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32), options)`` produces PTX and a cubin.

Facts: registers, stack, spill stores/loads from the ``ptxas -v`` log Triton prints, REG / SHARED / LOCAL from
``cuobjdump --dump-resource-usage`` of the cubin (shipped in the triton wheel), Triton's dynamic shared memory
from the kernel metadata, and the width of every global access attributed to its pointer argument from the
PTX (:mod:`bench.aot_ptx`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import warnings
from pathlib import Path

#: bump when the facts read from a binary change (invalidates the on-disk cache)
ANALYSIS_VERSION = 3
DTYPES = ("fp32", "fp16", "bf16")
#: plan-table rows S the triton backend passes: a uniform map slices one row; 8 per-row plans give 1 + 2 x 8
MAP_ROWS = {"uniform": 1, "per-row": 17}
KERNELS = ("add_rmsnorm", "glu", "affine")
#: role of every pointer argument: activation rows, plan-table rows, per-channel weights, the per-row slot
POINTER_ROLES = {
    "add_rmsnorm": {"r_ptr": "row", "d_ptr": "row", "s_ptr": "row", "n_ptr": "row", "w_ptr": "weight",
                    "dw_ptr": "weight", "a_ptr": "table", "b_ptr": "table", "slot_ptr": "slot"},
    "glu": {"g_ptr": "row", "u_ptr": "row", "y_ptr": "row", "a_ptr": "table", "b_ptr": "table",
            "slot_ptr": "slot"},
    "affine": {"x_ptr": "row", "y_ptr": "row", "a_ptr": "table", "b_ptr": "table", "slot_ptr": "slot"},
}
#: activation-row accesses every variant must show in its PTX (a missing one means the analysis lost track)
REQUIRED_ROWS = {
    "add_rmsnorm": {"r_ptr": "load", "d_ptr": "load", "s_ptr": "store", "n_ptr": "store"},
    "glu": {"g_ptr": "load", "u_ptr": "load", "y_ptr": "store"},
    "affine": {"x_ptr": "load", "y_ptr": "store"},
}


class VariantError(RuntimeError):
    """A variant could not be built or compiled; the message names the variant."""


def describe(v: dict) -> str:
    parts = [v["kernel"], v["dtype"], f"W={v['width']}", f"sm_{v['arch']}", f"map={v['map']}"]
    if v.get("family"):
        parts.append(v["family"])
    for k in ("inject", "bf16_store"):
        if v.get(k):
            parts.append(f"{k}={v[k]}")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------------
# the launch (kernel file's own *_launch on meta tensors)
# --------------------------------------------------------------------------------------------------
def call_site_launch(v: dict):
    """The :class:`fusesteer.kernels._common.Launch` the triton backend issues for variant ``v`` (1 row)."""
    import torch

    from fusesteer.kernels import add_rmsnorm as AR
    from fusesteer.kernels import affine as AF
    from fusesteer.kernels import glu as GL

    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[v["dtype"]]
    W, M = int(v["width"]), 1

    def meta(*shape, dtype=dt):
        return torch.empty(*shape, dtype=dtype, device="meta")

    if v["map"] == "none":
        a = b = slot = None
    elif v["map"] in MAP_ROWS:
        S = MAP_ROWS[v["map"]]
        a, b, slot = meta(S, W, dtype=torch.float32), meta(S, W, dtype=torch.float32), meta(M, dtype=torch.int32)
    else:
        raise VariantError(f"{describe(v)}: map must be none, uniform or per-row")
    kernel = v["kernel"]
    if kernel == "add_rmsnorm":
        gemma = v["family"] == "gemma"
        r, d = meta(M, W), meta(M, W)
        launch = AR.add_rmsnorm_launch(r, d, torch.empty_like(r), torch.empty_like(r), meta(W), 1e-6, a, b, slot,
                                       gemma, meta(W) if gemma else None)
    elif kernel == "glu":
        g = meta(M, W)
        act = {"llama": "silu", "gemma": "gelu_tanh"}[v["family"]]
        launch = GL.glu_launch(g, meta(M, W), torch.empty_like(g), a, b, slot, act)
    elif kernel == "affine":
        if a is None:
            raise VariantError(f"{describe(v)}: affine_map always has a map")
        x = meta(M, W)
        launch = AF.affine_launch(x, torch.empty_like(x), a, b, slot)
    else:
        raise VariantError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    if v.get("inject") == "spill":
        launch.num_warps = 1
    if v.get("bf16_store") == "bits":
        # the interpreter's store path (int16 bit patterns rounded in the kernel), compiled for the GPU
        if v["dtype"] != "bf16":
            raise VariantError(f"{describe(v)}: bf16_store=bits needs dtype bf16")
        import inspect

        params = list(inspect.signature(launch.fn.fn).parameters)
        outs = {params.index(n) for n, kind in REQUIRED_ROWS[kernel].items() if kind == "store"}
        launch.args = tuple(t.view(torch.int16) if i in outs else t for i, t in enumerate(launch.args))
        launch.constexprs = dict(launch.constexprs, OUT_BF16=True)
    return launch


# --------------------------------------------------------------------------------------------------
# Triton: specialization + compile
# --------------------------------------------------------------------------------------------------
def _triton_api():
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.compiler import compile as triton_compile
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as e:  # pragma: no cover - depends on the triton version
        raise VariantError(f"bench.aot needs triton with its NVIDIA backend (tested with 3.9): {e}") from None
    if not hasattr(JITFunction, "_pack_args"):  # pragma: no cover
        raise VariantError(f"triton {triton.__version__}: JITFunction has no _pack_args; bench.aot reads the "
                           "launch specialization through Triton's own binder (tested with triton 3.9)")
    return triton, GPUTarget, ASTSource, make_backend, triton_compile, create_function_from_signature


def specialize(launch, arch: int, align: bool = True):
    """(jit function, ASTSource, target, options): what ``JITFunction.run`` would compile for ``launch``."""
    triton, GPUTarget, ASTSource, make_backend, _, create_binder = _triton_api()
    from triton import knobs

    from fusesteer.kernels import _common as C

    if C.interpreter_enabled():
        raise VariantError("the Triton interpreter is on in the AOT worker (TRITON_INTERPRET=1); it must run "
                           "with TRITON_INTERPRET=0 to compile")
    if align:
        jf = launch.fn  # the kernel object the runtime launches (decorated at import)
    else:  # the launch minus the alignment / divisibility specialization (the gate's self-test)
        names = [p.name for p in launch.fn.params if not p.is_constexpr]
        jf = triton.jit(launch.fn.fn, do_not_specialize=names, do_not_specialize_on_alignment=names)
    target = GPUTarget("cuda", int(arch), 32)
    backend = make_backend(target)
    binder = create_binder(jf.signature, jf.params, backend)
    kwargs = dict(launch.constexprs, num_warps=launch.num_warps)
    kwargs["debug"] = kwargs.get("debug", jf.debug) or knobs.runtime.debug
    for k in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, k):
            kwargs[k] = getattr(knobs.compilation, k)
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = jf._pack_args(backend, kwargs, bound, spec, opts)
    return jf, ASTSource(jf, signature, constexprs, attrs), target, options


def _cache_key(src, target, options, sass: bool) -> str:
    import triton

    opts = json.dumps({k: repr(v) for k, v in sorted(options.__dict__.items())})
    text = f"{src.hash()}|{target}|{opts}|{triton.__version__}|{ANALYSIS_VERSION}|sass={sass}"
    return hashlib.sha256(text.encode()).hexdigest()


def binary_facts(src, target, options, name: str, arg_names: list, sass: bool = False) -> dict:
    """Compile and read the binary's facts (see module docstring)."""
    from triton import knobs

    from . import aot_ptx as P

    *_, triton_compile, _ = _triton_api()
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k = triton_compile(src, target=target, options=options.__dict__)
    pt = P.ptxas_facts(log.getvalue())
    if "regs" not in pt or "spill_stores" not in pt:
        raise VariantError("no ptxas -v log captured (was the kernel loaded from Triton's cache? the worker "
                           "runs with TRITON_ALWAYS_COMPILE=1)")
    cubin = k.asm["cubin"]
    res = P.cubin_resources(cubin, name)
    facts = {
        "regs": res["regs"], "ptxas_regs": pt["regs"], "spill_stores": pt["spill_stores"],
        "spill_loads": pt["spill_loads"], "stack_frame": pt["stack_frame"], "stack": res["stack"],
        "local_bytes": res["local"], "static_shared_bytes": res["shared"],
        "dynamic_shared_bytes": int(k.metadata.shared),
        "accesses": P.access_widths(k.asm["ptx"], arg_names),
        "ptx_lines": len(k.asm["ptx"].splitlines()),
    }
    if sass:
        facts["sass_instructions"] = P.sass_instructions(cubin)
    return facts


_MEMO: dict[str, dict] = {}


def compile_variant(v: dict, cache_dir: str | None = None, sass: bool = False) -> dict:
    """Launch facts + binary facts of variant ``v`` (a binary is compiled once per Triton cache key)."""
    try:
        launch = call_site_launch(v)
        jf, src, target, options = specialize(launch, v["arch"], align=v.get("inject") != "unaligned")
    except VariantError:
        raise
    except Exception as e:  # noqa: BLE001 - named after the variant
        raise VariantError(f"{describe(v)}: building the launch failed: {type(e).__name__}: {e}") from None
    arg_names = [n for n, t in src.signature.items() if t != "constexpr"]
    pointers = {n: t for n, t in src.signature.items() if t.startswith("*")}
    roles = POINTER_ROLES[v["kernel"]]
    unknown = sorted(set(pointers) - set(roles))
    if unknown:
        raise VariantError(f"{describe(v)}: pointer arguments {unknown} have no role in POINTER_ROLES "
                           f"(bench/aot_compile.py); known: {sorted(roles)}")
    key = _cache_key(src, target, options, sass)
    facts = _MEMO.get(key)
    path = Path(cache_dir) / f"{key}.json" if cache_dir else None
    source = "same binary as an earlier variant"
    if facts is None and path is not None and path.is_file():
        try:
            facts = json.loads(path.read_text())
            source = "disk cache"
        except (OSError, ValueError):
            facts = None
    if facts is None:
        source = "compiled"
        try:
            facts = binary_facts(src, target, options, jf.__name__, arg_names, sass=sass)
        except VariantError as e:
            raise VariantError(f"{describe(v)}: {e}") from None
        except Exception as e:  # noqa: BLE001 - compile errors are reported per variant
            msg = str(e).strip().splitlines()
            raise VariantError(f"{describe(v)}: Triton compile for sm_{v['arch']} failed: {type(e).__name__}: "
                               f"{' | '.join(msg[:6])[:600]}") from None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(facts))
            tmp.replace(path)
    _MEMO[key] = facts
    divisible = sorted(n for i, n in enumerate(src.signature)
                       if any(a[0] == "tt.divisibility" for a in src.attrs.get((i,), [])))
    return {
        "variant": v, "binary": key[:16], "source": source, "name": jf.__name__,
        "num_warps": launch.num_warps, "grid": [str(g) for g in launch.grid],
        "constexprs": {k: (int(c) if isinstance(c, bool) else c) for k, c in launch.constexprs.items()},
        "signature": {n: t for n, t in src.signature.items() if t != "constexpr"},
        "specialized_constants": sorted(n for i, n in enumerate(src.signature)
                                        if (i,) in src.constants and src.signature[n] == "constexpr"
                                        and n not in launch.constexprs),
        "divisible_by_16": divisible, "pointer_roles": {n: roles[n] for n in pointers}, **facts,
    }


def helpers_check() -> dict:
    """Do the shared device functions (:mod:`fusesteer.kernels._device`) cost anything on a GPU? Per kernel: the
    object launched is the ``JITFunction`` decorated at import, the device functions it calls, and whether one
    variant compiled for sm_90 has them inlined (no ``call`` in the PTX, no ``.func`` besides the kernel)."""
    import re

    *_, triton_compile, _ = _triton_api()
    from triton.runtime.jit import JITFunction

    out = {"kernels": []}
    probes = ({"kernel": "add_rmsnorm", "dtype": "bf16", "arch": 90, "width": 4096, "map": "per-row",
               "family": "gemma"},
              {"kernel": "glu", "dtype": "bf16", "arch": 90, "width": 14336, "map": "per-row", "family": "llama"},
              {"kernel": "affine", "dtype": "bf16", "arch": 90, "width": 4096, "map": "uniform", "family": None})
    for v in probes:
        launch = call_site_launch(v)
        fn = launch.fn.fn
        helpers = sorted(n for n in fn.__code__.co_names if isinstance(fn.__globals__.get(n), JITFunction))
        _, src, target, options = specialize(launch, v["arch"])
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ptx = triton_compile(src, target=target, options=options.__dict__).asm["ptx"]
        out["kernels"].append({"kernel": v["kernel"], "type": type(launch.fn).__name__, "helpers": helpers,
                               "calls": len(re.findall(r"^\s*call", ptx, re.M)),
                               "funcs": len(re.findall(r"^\.func\b|^\.visible \.func\b", ptx, re.M))})
    return out


# --------------------------------------------------------------------------------------------------
# worker loop: one JSON job per stdin line -> one JSON result per line on the original stdout
# --------------------------------------------------------------------------------------------------
def main() -> int:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed (Triton, ptxas) goes to stderr, never into the result stream
    warnings.filterwarnings("ignore")
    try:
        _triton_api()
    except VariantError as e:
        out.write(json.dumps({"fatal": str(e)}) + "\n")
        return 2
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        if job.get("helpers_check"):
            try:
                out.write(json.dumps({"id": job["id"], "results": [{"helpers_check": helpers_check()}]}) + "\n")
            except Exception as e:  # noqa: BLE001
                out.write(json.dumps({"id": job["id"], "results": [{"helpers_check": {
                    "error": f"{type(e).__name__}: {e}"}}]}) + "\n")
            continue
        results = []
        for v in job["variants"]:
            try:
                results.append(compile_variant(v, job.get("cache"), job.get("sass", False)))
            except VariantError as e:
                results.append({"variant": v, "error": str(e)})
            except Exception as e:  # noqa: BLE001 - never lose the other variants of the job
                results.append({"variant": v, "error": f"{describe(v)}: {type(e).__name__}: {e}"})
        out.write(json.dumps({"id": job["id"], "results": results}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
