"""`python -m bench.aot --out DIR` (from the source checkout's root; developer tooling, not installed): compile
every Triton kernel variant the backends launch for sm_80, sm_90 and
sm_100 on a machine without a GPU, read registers / spills / shared memory from the cubins and the global
access widths from the PTX, and gate on them.

Variants: each kernel (``add_rmsnorm``, ``glu``, ``affine``) x fp32 / fp16 / bf16 x map (none, uniform = one
plan, per-row = 8 plans; ``affine_map`` always has a map) x Llama / Gemma convention (RMSNorm ``w`` vs
``1 + w`` with Gemma's post-norm; SiLU vs tanh-GELU) x the widths of :data:`MODELS` at the site each kernel
serves (hidden size for the residual add + norm and ``mlp.out``, intermediate size for the GLU, heads x
head_dim for ``attn.o_proj.in``) x arch. Each variant is compiled in worker processes
(:mod:`bench.aot_compile`) through the kernel file's own ``*_launch`` function and Triton's own launch
binder, so the binary is the one a real launch of that shape gets; variants that map to the same Triton cache
key (e.g. every GLU width above 1024: same BLOCK_W, same specialization) share one binary. Facts are cached
on disk per binary (``$FUSESTEER_CACHE/aot``, ``--no-cache`` to recompile).

Gate (exit 1 when it fails): no variant spills (ptxas spill stores/loads and the cubin's LOCAL memory are 0),
and where a row is aligned -- W divisible by 16 and 16-byte aligned base pointers, which is what the backend
passes (fresh contiguous tensors, table rows of W float32) -- every global access to activation rows,
plan-table rows and norm weights is 128 bits wide, unless the launch gives a thread less than 16 bytes of the
row (only the tiny test widths 64 / 96 do; those are reported, not gated). ``--inject spill|unaligned`` adds a
variant built to break each rule (1 warp for an 8192-wide fp32 row; the launch without the alignment /
divisibility specialization), to show that the gate fails.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import select
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import fusesteer
from fusesteer.bench.paths import resolve_out
from fusesteer.errors import FuseSteerError

from . import roofline as RL
from .aot_compile import DTYPES, KERNELS, REQUIRED_ROWS, describe

#: the checkout's root (holds the ``bench`` package) and the folder holding the ``fusesteer`` this process imported
CHECKOUT = Path(__file__).resolve().parents[1]
FUSESTEER_PARENT = Path(fusesteer.__file__).resolve().parents[1]
#: the default ``--out``: the checkout's results folder
DEFAULT_OUT = CHECKOUT / "bench" / "results" / "aot"

AOT_JSON = "aot.json"
JOB_TIMEOUT_S = 600  # one job = the widths of one (kernel, family, map, dtype, arch): seconds, normally
AOT_MD = "aot.md"
ARCHS = (80, 90, 100)
FAMILIES = ("llama", "gemma")
#: (name, family, hidden, intermediate, attention width = heads x head_dim)
MODELS = (
    ("tiny test models", "all", 64, 96, 64),
    ("SmolLM2-135M", "llama", 576, 1536, 576),
    ("Gemma-3-270M", "gemma3", 640, 2048, 1024),
    ("Qwen2.5-0.5B", "qwen2", 896, 4864, 896),
    ("Qwen3-0.6B", "qwen3", 1024, 3072, 2048),
    ("Gemma-2-2B", "gemma2", 2304, 9216, 2048),
    ("Gemma-2-9B", "gemma2", 3584, 14336, 4096),
    ("Llama-3-8B", "llama", 4096, 14336, 4096),
    ("Qwen3-8B", "qwen3", 4096, 12288, 4096),
    ("Llama-3-70B", "llama", 8192, 28672, 8192),
)
MAPS = {"add_rmsnorm": ("none", "uniform", "per-row"), "glu": ("none", "uniform", "per-row"),
        "affine": ("uniform", "per-row")}
#: the bf16-store check: one variant per kernel, the interpreter's bit-level RNE store vs the GPU path's
#: `.to(tl.bfloat16)` store (cvt.rn.bf16.f32), both compiled for the GPU
BF16_CHECK = (("add_rmsnorm", "llama", "per-row", 4096), ("add_rmsnorm", "gemma", "per-row", 4096),
              ("glu", "gemma", "per-row", 14336), ("affine", None, "per-row", 4096))
INJECT = {
    "spill": {"kernel": "add_rmsnorm", "dtype": "fp32", "width": 8192, "map": "per-row", "family": "gemma",
              "inject": "spill"},
    "unaligned": {"kernel": "affine", "dtype": "bf16", "width": 4096, "map": "per-row", "family": None,
                  "inject": "unaligned"},
}


class AOTError(RuntimeError):
    pass


def site_widths() -> dict[str, dict[int, list[str]]]:
    """{kernel: {width: [models]}}: the widths each kernel is launched with."""
    out: dict[str, dict[int, list[str]]] = {k: {} for k in KERNELS}
    for name, _fam, hidden, inter, attn in MODELS:
        for kernel, widths in (("add_rmsnorm", (hidden,)), ("glu", (inter,)), ("affine", (hidden, attn))):
            for w in widths:
                lst = out[kernel].setdefault(w, [])
                if name not in lst:
                    lst.append(name)
    return {k: dict(sorted(v.items())) for k, v in out.items()}


@dataclass
class AOTConfig:
    out: Path | None = None
    archs: tuple = ARCHS
    dtypes: tuple = DTYPES
    kernels: tuple = KERNELS
    widths: tuple | None = None  # restrict to these widths (tests); None = all of MODELS
    jobs: int | None = None  # worker processes (default: min(4, CPU count))
    cache: bool = True
    cache_dir: Path | None = None
    inject: tuple = ()
    bf16_check: bool = True
    helpers_check: bool = True
    progress: bool = True
    log: object = print
    extra_variants: list = field(default_factory=list)


def enumerate_variants(cfg: AOTConfig) -> list[dict]:
    widths = site_widths()
    out = []
    for arch in cfg.archs:
        for kernel in cfg.kernels:
            for family in (FAMILIES if kernel != "affine" else (None,)):
                for map_ in MAPS[kernel]:
                    for dtype in cfg.dtypes:
                        for w in widths[kernel]:
                            if cfg.widths is not None and w not in cfg.widths:
                                continue
                            out.append({"kernel": kernel, "dtype": dtype, "arch": arch, "width": w, "map": map_,
                                        "family": family})
    for name in cfg.inject:
        if name not in INJECT:
            raise AOTError(f"--inject {name!r}: expected one of {sorted(INJECT)}")
        out.append(dict(INJECT[name], arch=cfg.archs[0]))
    out += [dict(v) for v in cfg.extra_variants]
    return out


# --------------------------------------------------------------------------------------------------
# worker processes
# --------------------------------------------------------------------------------------------------
def _worker_env(triton_cache: str) -> dict:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"  # compile for real: @triton.jit must build JITFunctions
    env["TRITON_ALWAYS_COMPILE"] = "1"  # run ptxas every time: its -v log is where the spill bytes come from
    env["TRITON_CACHE_DIR"] = triton_cache  # a private scratch cache, never the user's
    # the workers import this very fusesteer (installed or a checkout) and this checkout's bench package
    paths = list(dict.fromkeys([str(FUSESTEER_PARENT), str(CHECKOUT)]))
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_jobs(jobs: list[dict], n_workers: int, progress: bool = True, desc: str = "compiling") -> list[dict]:
    """Run ``jobs`` ({"variants": [...], ...}) on ``n_workers`` worker processes; returns every result."""
    from tqdm.auto import tqdm

    todo: queue.Queue = queue.Queue()
    for i, j in enumerate(jobs):
        todo.put(dict(j, id=i))
    results: list[dict] = []
    lock = threading.Lock()
    total = sum(len(j.get("variants", ())) or 1 for j in jobs)
    bar = tqdm(total=total, desc=desc, unit="variant", disable=not progress, leave=False)
    fatal: list[str] = []

    with tempfile.TemporaryDirectory(prefix="fusesteer-aot-") as scratch:
        env = _worker_env(os.path.join(scratch, "triton-cache"))

        def work(k: int) -> None:
            errf = open(os.path.join(scratch, f"worker{k}.err"), "w+")
            proc = subprocess.Popen([sys.executable, "-m", "bench.aot_compile"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=errf, text=True, env=env, cwd=str(CHECKOUT))
            try:
                while True:
                    try:
                        job = todo.get_nowait()
                    except queue.Empty:
                        return
                    proc.stdin.write(json.dumps(job) + "\n")
                    proc.stdin.flush()
                    ready, _, _ = select.select([proc.stdout], [], [], JOB_TIMEOUT_S)
                    line = proc.stdout.readline() if ready else ""
                    msg = json.loads(line) if line.strip() else None
                    if msg is None or "fatal" in msg:
                        errf.seek(0)
                        tail = (msg or {}).get("fatal") or errf.read()[-1500:]
                        if not ready:
                            tail += f"\nno answer within {JOB_TIMEOUT_S} s (worker killed)"
                            proc.kill()
                        with lock:
                            fatal.append(tail)
                            results.extend({"variant": v, "error": f"{describe(v)}: the compile worker died: "
                                            f"{tail.strip().splitlines()[-1] if tail.strip() else '?'}"}
                                           for v in job.get("variants", ()))
                        return
                    with lock:
                        results.extend(msg["results"])
                        bar.update(len(msg["results"]) or 1)
            finally:
                try:
                    proc.stdin.close()
                    proc.wait(timeout=30)
                except Exception:  # noqa: BLE001 - best effort shutdown of our own worker
                    proc.kill()
                errf.close()

        threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(max(1, n_workers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    bar.close()
    left = []
    while not todo.empty():
        left.append(todo.get_nowait())
    for job in left:
        results.extend({"variant": v, "error": f"{describe(v)}: no compile worker left ({fatal[:1]})"}
                       for v in job.get("variants", ()))
    if fatal and not any("error" not in r for r in results):
        raise AOTError("every AOT compile worker failed: " + fatal[0].strip()[-800:])
    return results


def _batches(variants: list[dict]) -> list[list[dict]]:
    """Group the widths of one (kernel, family, map, dtype, arch): they often share one binary."""
    groups: dict[tuple, list[dict]] = {}
    for v in variants:
        key = (v["kernel"], v.get("family"), v["map"], v["dtype"], v["arch"], v.get("inject"), v.get("bf16_store"),
               v.get("purpose"))
        groups.setdefault(key, []).append(v)
    return sorted(groups.values(), key=len, reverse=True)


# --------------------------------------------------------------------------------------------------
# the gate
# --------------------------------------------------------------------------------------------------
def _elem_bits(role: str, dtype: str) -> int:
    return 32 if role == "table" else {"fp32": 32, "fp16": 16, "bf16": 16}[dtype]


def evaluate(res: dict) -> dict:
    """One ``aot.json`` variant record (the required fields first) from a worker result, with the gate."""
    v = res["variant"]
    base = {"kernel": v["kernel"], "dtype": v["dtype"], "arch": f"sm_{v['arch']}", "width": v["width"]}
    b = RL.kernel_bytes(v["kernel"], v["dtype"], v["width"], v["map"], v.get("family"))
    extra = {"family": v.get("family"), "map": v["map"], "inject": v.get("inject"),
             "models": site_widths()[v["kernel"]].get(v["width"], []), "fixed_bytes": b["fixed"],
             "table_bytes_per_plan": b["table"]}
    if "error" in res:
        return {**base, "num_warps": None, "regs": None, "spill_bytes": None, "shared_bytes": None,
                "load_bits": None, "store_bits": None, "bytes_per_row": b["per_row"], **extra,
                "status": "FAIL", "problems": [res["error"]]}
    problems = []
    spill = res["spill_stores"] + res["spill_loads"]
    if spill or res["local_bytes"] or res["stack_frame"]:
        problems.append(f"spills: ptxas reports {res['spill_stores']} bytes spill stores, {res['spill_loads']} "
                        f"bytes spill loads, {res['stack_frame']} bytes stack frame; cubin LOCAL "
                        f"{res['local_bytes']} (expected 0: {res['regs']} registers with {res['num_warps']} warps)")
    roles = res["pointer_roles"]
    widths: dict[tuple, list[int]] = {}
    for a in res["accesses"]:
        ptrs = [n for n in a["args"] if n in roles]
        if len(ptrs) != 1:
            problems.append(f"a global {a['kind']} ({a['op']}) could not be attributed to one pointer argument "
                            f"(found {ptrs or 'none'})")
            continue
        widths.setdefault((ptrs[0], a["kind"]), []).append(a["bits"])
    for ptr, kind in REQUIRED_ROWS[v["kernel"]].items():
        if (ptr, kind) not in widths:
            problems.append(f"no global {kind} of {ptr} found in the PTX (the access analysis lost track of it)")
    block = res["constexprs"].get("BLOCK", res["constexprs"].get("BLOCK_W"))
    elems = block / (32 * res["num_warps"])
    aligned = v["width"] % 16 == 0
    narrow = {}
    gated = {}
    for role in ("row", "table", "weight"):
        tile_bytes = elems * _elem_bits(role, v["dtype"]) / 8
        gated[role] = aligned and tile_bytes >= 16
        for (ptr, kind), bits in widths.items():
            if roles[ptr] != role:
                continue
            narrow.setdefault((role, kind), []).append(min(bits))
            if gated[role] and min(bits) < 128:
                problems.append(
                    f"{kind}s of {ptr} ({role}) are {min(bits)}-bit, expected 128-bit: the row is aligned "
                    f"(W = {v['width']} divisible by 16, 16-byte aligned pointers) and each thread holds "
                    f"{tile_bytes:g} bytes of it (BLOCK {block}, {res['num_warps']} warps)")

    def lo(role, kind):
        xs = narrow.get((role, kind))
        return min(xs) if xs else None

    why = None
    if not aligned:
        why = f"row not aligned: W = {v['width']} is not divisible by 16"
    elif not gated["row"]:
        why = (f"narrow tile: {elems:g} elements ({elems * _elem_bits('row', v['dtype']) / 8:g} B) of the row per "
               f"thread (BLOCK {block}, {res['num_warps']} warps), < 16 B")
    return {**base, "num_warps": res["num_warps"], "regs": res["regs"], "spill_bytes": spill,
            "shared_bytes": res["static_shared_bytes"] + res["dynamic_shared_bytes"],
            "load_bits": lo("row", "load"), "store_bits": lo("row", "store"), "bytes_per_row": b["per_row"],
            **extra, "block": block, "table_bits": lo("table", "load"), "weight_bits": lo("weight", "load"),
            "width_gated": gated["row"], "not_gated_because": why, "local_bytes": res["local_bytes"],
            "static_shared_bytes": res["static_shared_bytes"], "dynamic_shared_bytes": res["dynamic_shared_bytes"],
            "binary": res["binary"], "divisible_by_16": res["divisible_by_16"],
            "specialized_constants": res["specialized_constants"], "status": "FAIL" if problems else "pass",
            "problems": problems}


def summarize(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["regs"] is not None]
    gated = [r for r in ok if r.get("width_gated")]
    top = max(ok, key=lambda r: r["regs"]) if ok else None
    per = {}
    for r in ok:
        k = per.setdefault(f"{r['kernel']} {r['arch']}", {"variants": 0, "binaries": set(), "regs": [], "spill": 0,
                                                            "shared": 0})
        k["variants"] += 1
        k["binaries"].add(r["binary"])
        k["regs"].append(r["regs"])
        k["spill"] += r["spill_bytes"]
        k["shared"] = max(k["shared"], r["shared_bytes"])
    return {
        "variants": len(rows), "binaries": len({r["binary"] for r in ok}),
        "failed": sum(r["status"] == "FAIL" for r in rows), "errors": sum(r["regs"] is None for r in rows),
        "spill_bytes_total": sum(r["spill_bytes"] for r in ok),
        "max_regs": top["regs"] if top else None,
        "max_regs_variant": (f"{top['kernel']} {top['family'] or ''} {top['dtype']} W={top['width']} {top['arch']} "
                             f"map={top['map']} ({top['num_warps']} warps)") if top else None,
        "width_gated_variants": len(gated),
        "min_load_bits_gated": min((r["load_bits"] for r in gated), default=None),
        "min_store_bits_gated": min((r["store_bits"] for r in gated), default=None),
        "min_table_bits_gated": min((r["table_bits"] for r in gated if r["table_bits"]), default=None),
        "min_weight_bits_gated": min((r["weight_bits"] for r in gated if r["weight_bits"]), default=None),
        "not_width_gated": sorted({f"{r['kernel']} W={r['width']}: {r['not_gated_because']}" for r in ok
                                   if not r.get("width_gated")}),
        "per_kernel_arch": {k: {"variants": d["variants"], "binaries": len(d["binaries"]), "regs_min": min(d["regs"]),
                                "regs_max": max(d["regs"]), "spill_bytes": d["spill"], "shared_max": d["shared"]}
                            for k, d in sorted(per.items())},
    }


def bf16_store_check(results: list[dict]) -> list[dict]:
    """Pair each bf16 check variant: the interpreter's bit-level RNE store (``bits``) and the GPU path's
    ``.to(tl.bfloat16)`` store (``cvt``), both compiled for the GPU."""
    pairs: dict[tuple, dict] = {}
    for res in results:
        v = res["variant"]
        key = (v["kernel"], v.get("family"), v["map"], v["width"], v["arch"])
        pairs.setdefault(key, {})[v.get("bf16_store") or "cvt"] = res
    out = []
    for (kernel, family, map_, width, arch), p in sorted(pairs.items(), key=lambda kv: str(kv[0])):
        bits, cvt = p.get("bits"), p.get("cvt")
        row = {"kernel": kernel, "family": family, "map": map_, "width": width, "arch": f"sm_{arch}"}
        if not bits or not cvt or "error" in bits or "error" in cvt:
            row["error"] = next((x["error"] for x in (bits, cvt) if x and "error" in x), "missing result")
            out.append(row)
            continue

        def st(r):
            return min((a["bits"] for a in r["accesses"] if a["kind"] == "store"), default=None)
        row.update(gpu_path_out_bf16=cvt["constexprs"].get("OUT_BF16"),
                   regs_bits=bits["regs"], regs_cvt=cvt["regs"],
                   sass_bits=bits.get("sass_instructions"), sass_cvt=cvt.get("sass_instructions"),
                   store_bits_bits=st(bits), store_bits_cvt=st(cvt),
                   spill_bits=bits["spill_stores"] + bits["spill_loads"],
                   spill_cvt=cvt["spill_stores"] + cvt["spill_loads"])
        row["sass_saved"] = (row["sass_bits"] - row["sass_cvt"]) if row["sass_bits"] is not None else None
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    from fusesteer.models import cache_root

    return cache_root() / "aot"


def run_aot(cfg: AOTConfig) -> dict:
    """Compile, analyse and gate; writes ``aot.json`` and ``aot.md`` to ``cfg.out`` when given."""
    t0 = time.perf_counter()
    log = cfg.log
    for a in cfg.archs:
        if a not in ARCHS:
            raise AOTError(f"--archs {a}: expected some of {ARCHS}")
    variants = enumerate_variants(cfg)
    cache_dir = None
    if cfg.cache:
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        cache_dir.mkdir(parents=True, exist_ok=True)
    n_workers = cfg.jobs or max(1, min(4, os.cpu_count() or 1))
    jobs = [{"variants": b, "cache": str(cache_dir) if cache_dir else None} for b in _batches(variants)]
    check = []
    if cfg.bf16_check and "bf16" in cfg.dtypes:
        for arch in cfg.archs:
            for kernel, family, map_, w in BF16_CHECK:
                if kernel in cfg.kernels:
                    for store in ("cvt", "bits"):
                        check.append({"kernel": kernel, "family": family, "map": map_, "dtype": "bf16",
                                      "width": w, "arch": arch, "purpose": "bf16_store_check",
                                      **({"bf16_store": "bits"} if store == "bits" else {})})
        jobs += [{"variants": b, "cache": str(cache_dir) if cache_dir else None, "sass": True}
                 for b in _batches(check)]
    if cfg.helpers_check:
        jobs.append({"helpers_check": True, "variants": []})
    log(f"bench.aot: {len(variants)} kernel variants ({', '.join(cfg.kernels)}; {', '.join(cfg.dtypes)}; "
        f"{', '.join(f'sm_{a}' for a in cfg.archs)})"
        f"{' + ' + str(len(check)) + ' for the bf16-store check' if check else ''}"
        f", {n_workers} worker processes, cache {cache_dir or 'off'}")
    results = run_jobs(jobs, n_workers, progress=cfg.progress)
    helpers = next((r["helpers_check"] for r in results if "helpers_check" in r), None)
    results = [r for r in results if "variant" in r]
    is_check = [r for r in results if r["variant"].get("purpose") == "bf16_store_check"]
    main = [r for r in results if r["variant"].get("purpose") != "bf16_store_check"]
    order = {json.dumps(v, sort_keys=True): i for i, v in enumerate(variants)}
    main.sort(key=lambda r: order.get(json.dumps(r["variant"], sort_keys=True), 1 << 30))
    rows = [evaluate(r) for r in main]
    seconds = round(time.perf_counter() - t0, 1)
    summary = summarize(rows)
    summary["compiled_binaries"] = sum(r.get("source") == "compiled" for r in main)
    summary["binaries_from_disk_cache"] = sum(r.get("source") == "disk cache" for r in main)
    summary["seconds"] = seconds
    summary["workers"] = n_workers
    from importlib import metadata

    result = {
        "variants": rows,
        "summary": summary,
        "gate": "PASS" if summary["failed"] == 0 else "FAIL",
        "bf16_store_check": bf16_store_check(is_check),
        "helpers_check": helpers,
        "roofline": RL.roofline(),
        "config": {"archs": [f"sm_{a}" for a in cfg.archs], "dtypes": list(cfg.dtypes), "kernels": list(cfg.kernels),
                   "widths": site_widths() if cfg.widths is None else list(cfg.widths), "inject": list(cfg.inject),
                   "models": [dict(zip(("name", "family", "hidden", "intermediate", "attn_width"), m)) for m in MODELS],
                   "triton": metadata.version("triton")},
    }
    if cfg.out is not None:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (AOT_JSON + ".tmp")
        rest = json.dumps({k: v for k, v in result.items() if k != "variants"}, indent=1)
        tmp.write_text('{"variants": [\n' + ",\n".join(json.dumps(v) for v in rows) + "\n],\n" + rest[1:].lstrip()
                       + "\n")
        json.loads(tmp.read_text())  # one variant per line, still one JSON document
        tmp.replace(out / AOT_JSON)
        (out / AOT_MD).write_text("\n".join(markdown(result)) + "\n")
    return result


def _b(x) -> str:
    return "–" if x is None else str(x)


def markdown(r: dict) -> list[str]:
    s = r["summary"]
    c = r["config"]
    L = [f"# AOT compile check of the fusesteer kernels ({', '.join(c['archs'])}, triton {c['triton']})", "",
         f"`python -m bench.aot`: {s['variants']} variants ({s['binaries']} distinct binaries), gate "
         f"**{r['gate']}**: {s['failed']} failing, spill bytes total {s['spill_bytes_total']}, max registers "
         f"{s['max_regs']} ({s['max_regs_variant']}); narrowest global access in the {s['width_gated_variants']} "
         f"width-gated variants: activation loads {_b(s['min_load_bits_gated'])} / stores "
         f"{_b(s['min_store_bits_gated'])} bits, plan tables {_b(s['min_table_bits_gated'])}, norm weights "
         f"{_b(s['min_weight_bits_gated'])}; {s['seconds']} s with {s['workers']} workers "
         f"({s['compiled_binaries']} binaries compiled, {s['binaries_from_disk_cache']} from the disk cache).", ""]
    if s["not_width_gated"]:
        L += ["Not width-gated (reported only): " + "; ".join(s["not_width_gated"]), ""]
    bad = [v for v in r["variants"] if v["status"] == "FAIL"]
    if bad:
        L += ["## Failures", ""]
        for v in bad:
            L.append(f"- {v['kernel']} {v['family'] or ''} {v['dtype']} W={v['width']} {v['arch']} map={v['map']}"
                     f"{' inject=' + v['inject'] if v.get('inject') else ''}: " + "; ".join(v["problems"]))
        L.append("")
    L += ["## Per kernel and arch", "", "| kernel | arch | variants | binaries | registers | spill bytes | "
          "max shared bytes |", "|---|---|---|---|---|---|---|"]
    for k, d in s["per_kernel_arch"].items():
        kern, arch = k.split()
        L.append(f"| {kern} | {arch} | {d['variants']} | {d['binaries']} | {d['regs_min']}–{d['regs_max']} | "
                 f"{d['spill_bytes']} | {d['shared_max']} |")
    if r.get("bf16_store_check"):
        L += ["", "## bf16 store: the interpreter's bit-level round-to-nearest-even vs the GPU path's "
              "`.to(tl.bfloat16)`", "",
              "Both compiled for the GPU; the runtime launches the `.to(tl.bfloat16)` store on a GPU (`OUT_BF16` = "
              "False) and the bit-level one only under the Triton interpreter, whose own cast truncates.", "",
              "| kernel | W | arch | registers bits / cvt | SASS instructions bits / cvt | store bits bits / cvt "
              "| spills |", "|---|---|---|---|---|---|---|"]
        for b in r["bf16_store_check"]:
            if "error" in b:
                L.append(f"| {b['kernel']} {b['family'] or ''} | {b['width']} | {b['arch']} | error: {b['error']} |||")
                continue
            L.append(f"| {b['kernel']} {b['family'] or ''} {b['map']} | {b['width']} | {b['arch']} | "
                     f"{b['regs_bits']} / {b['regs_cvt']} | {b['sass_bits']} / {b['sass_cvt']} | "
                     f"{b['store_bits_bits']} / {b['store_bits_cvt']} | {b['spill_bits']} / {b['spill_cvt']} |")
    hc = r.get("helpers_check")
    if hc:
        L += ["", "## Shared device functions (`fusesteer/kernels/_device.py`)", ""]
        if "error" in hc:
            L.append(f"error: {hc['error']}")
        for k in hc.get("kernels", []):
            L.append(f"- {k['kernel']}: launches the {k['type']} decorated at import; calls {', '.join(k['helpers'])}; "
                     f"compiled for sm_90: {k['calls']} call instructions, {k['funcs']} device functions in the PTX "
                     "(inlined)")
    L += ["", "## Static roofline", ""] + RL.markdown(r["roofline"])
    L += ["", "## All variants", "", "| kernel | family | map | dtype | arch | W | warps | regs | spill | shared | "
          "load bits | store bits | table bits | bytes/row | status |", "|" + "---|" * 15]
    for v in r["variants"]:
        L.append(f"| {v['kernel']} | {v['family'] or '–'} | {v['map']} | {v['dtype']} | {v['arch']} | {v['width']} | "
                 f"{_b(v['num_warps'])} | {_b(v['regs'])} | {_b(v['spill_bytes'])} | {_b(v['shared_bytes'])} | "
                 f"{_b(v['load_bits'])} | {_b(v['store_bits'])} | {_b(v.get('table_bits'))} | {v['bytes_per_row']} | "
                 f"{v['status']}{' (not gated)' if v.get('not_gated_because') else ''} |")
    return L


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.aot", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (aot.json, aot.md)")
    p.add_argument("--archs", nargs="+", type=int, choices=ARCHS, default=list(ARCHS),
                   help="compute capabilities to compile for")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), help="activation dtypes")
    p.add_argument("--jobs", type=int, default=None, help="compile worker processes (default: min(4, CPUs))")
    p.add_argument("--no-cache", action="store_true",
                   help="recompile every binary (default: reuse facts cached in $FUSESTEER_CACHE/aot)")
    p.add_argument("--inject", nargs="+", choices=sorted(INJECT), default=None,
                   help="add a variant built to fail the gate (1 warp for an 8192-wide fp32 row; no alignment "
                        "specialization) to show the gate bites")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    """`python -m bench.aot ...`: exit 0 when the gate passes, 1 when it fails, 2 on a usage error."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (AOTError, FuseSteerError) as e:
        print(f"bench.aot: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    out = resolve_out(args.out)  # created (or refused) before minutes of compiling
    cfg = AOTConfig(out=out, archs=tuple(args.archs), dtypes=tuple(args.dtypes), jobs=args.jobs,
                    cache=not args.no_cache, inject=tuple(args.inject or ()), progress=not args.no_progress)
    r = run_aot(cfg)
    s = r["summary"]
    print(f"aot gate: {r['gate']} ({s['variants']} variants, {s['binaries']} binaries, {s['failed']} failing; "
          f"spill bytes {s['spill_bytes_total']}; max registers {s['max_regs']} [{s['max_regs_variant']}]; "
          f"narrowest gated access: loads {_b(s['min_load_bits_gated'])} / stores {_b(s['min_store_bits_gated'])} "
          f"bits; {s['seconds']} s)")
    for v in r["variants"]:
        if v["status"] == "FAIL":
            print(f"  FAIL {v['kernel']} {v['family'] or ''} {v['dtype']} W={v['width']} {v['arch']} map={v['map']}"
                  f"{' inject=' + v['inject'] if v.get('inject') else ''}: " + "; ".join(v["problems"]))
    for b in r["bf16_store_check"]:
        if "error" not in b:
            print(f"  bf16 store {b['kernel']} {b['family'] or ''} {b['arch']}: registers {b['regs_bits']} (bit-level "
                  f"RNE, interpreter path) vs {b['regs_cvt']} (.to(bf16), GPU path); SASS {b['sass_bits']} vs "
                  f"{b['sass_cvt']}; store {b['store_bits_bits']} vs {b['store_bits_cvt']} bits")
    print(f"results: {out / AOT_JSON}, {out / AOT_MD}")
    return 0 if r["gate"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
