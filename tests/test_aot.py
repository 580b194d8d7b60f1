"""GPU readiness without a GPU: the AOT compile check (`python -m bench.aot`, developer tooling in the checkout's
``bench/`` folder, not installed), its gate and the static roofline of its report. (`fusesteer bench gpu`, the
installed GPU suite, is tests/test_bench_gpu.py.)

The full AOT sweep (every kernel variant for sm_80 / sm_90 / sm_100, 1152 variants, 360 distinct binaries)
runs once per session in worker processes with a fresh cache: about 2 minutes on 2 cores. The gate's
self-tests compile a handful of variants each (same cache).
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest  # noqa: E402

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from bench import aot as A  # noqa: E402
from bench import aot_ptx as P  # noqa: E402
from bench import roofline as RL  # noqa: E402
from fusesteer.bench import traffic as TR  # noqa: E402

REQUIRED = ("kernel", "dtype", "arch", "width", "num_warps", "regs", "spill_bytes", "shared_bytes", "load_bits",
            "store_bits", "bytes_per_row")
JOBS = max(1, min(2, os.cpu_count() or 1))


def _have_nvidia_backend() -> bool:
    try:
        P.cuobjdump_path()
    except Exception:  # noqa: BLE001
        return False
    return True


needs_backend = pytest.mark.skipif(not _have_nvidia_backend(), reason="triton's NVIDIA backend (ptxas, cuobjdump) "
                                   "is not installed")


@pytest.fixture(scope="session")
def aot_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("aot-cache")


@pytest.fixture(scope="session")
def full_sweep(tmp_path_factory, aot_cache):
    out = tmp_path_factory.mktemp("aot")
    cfg = A.AOTConfig(out=out, jobs=JOBS, cache_dir=aot_cache, progress=False, log=lambda *a: None)
    return A.run_aot(cfg), out


# --------------------------------------------------------------------------------------------------
# the real kernels pass
# --------------------------------------------------------------------------------------------------
@needs_backend
def test_full_sweep_passes_the_gate(full_sweep):
    r, out = full_sweep
    doc = json.loads((out / A.AOT_JSON).read_text())
    rows = doc["variants"]
    n = len(A.enumerate_variants(A.AOTConfig()))
    assert n == 1152 and len(rows) == n
    bad = [(v["kernel"], v["dtype"], v["arch"], v["width"], v["map"], v["problems"]) for v in rows
           if v["status"] != "pass"]
    assert not bad, bad
    assert doc["gate"] == "PASS" and r["summary"]["failed"] == 0
    for v in rows:
        assert all(k in v for k in REQUIRED)
        assert v["spill_bytes"] == 0 and v["local_bytes"] == 0
        assert 0 < v["regs"] <= 255
        if v["width_gated"]:
            assert v["load_bits"] == 128 and v["store_bits"] == 128, v
            assert v["table_bits"] in (None, 128) and v["weight_bits"] in (None, 128), v
    # every width of the supported models is aligned and gated except the tiny test models' 64 / 96
    assert {v["width"] for v in rows if not v["width_gated"]} == {64, 96}
    s = r["summary"]
    assert s["binaries"] == 360 and s["spill_bytes_total"] == 0 and s["max_regs"] <= 128
    assert s["min_load_bits_gated"] == s["min_store_bits_gated"] == 128
    assert {k.split()[1] for k in s["per_kernel_arch"]} == {"sm_80", "sm_90", "sm_100"}
    md = (out / A.AOT_MD).read_text()
    assert "gate **PASS**" in md and "PREDICTION" in md and md.count("\n| ") > n


@needs_backend
def test_sweep_compiles_what_the_runtime_launches(full_sweep):
    """Launch configs come from the kernel files' own *_launch functions (no second copy here)."""
    from fusesteer.kernels import _common as C

    rows = {(v["kernel"], v["family"], v["map"], v["dtype"], v["arch"], v["width"]): v
            for v in full_sweep[0]["variants"]}
    for dt, e in (("bf16", 2), ("fp16", 2), ("fp32", 4)):
        for w in (576, 2304, 4096, 8192):
            v = rows[("add_rmsnorm", "llama", "per-row", dt, "sm_90", w)]
            assert v["num_warps"] == C.row_num_warps(C.next_pow2(w), e) and v["block"] == C.next_pow2(w)
    assert rows[("glu", "gemma", "uniform", "bf16", "sm_80", 14336)]["block"] == C.MAX_ELEMENTWISE_BLOCK
    assert rows[("affine", None, "per-row", "bf16", "sm_100", 1024)]["num_warps"] == 4
    # the uniform map's S = 1 is specialized to a constexpr, as Triton does at launch; per-row S is not
    assert rows[("affine", None, "uniform", "fp32", "sm_90", 4096)]["specialized_constants"] == ["S"]
    assert rows[("affine", None, "per-row", "fp32", "sm_90", 4096)]["specialized_constants"] == []
    assert "W" in rows[("glu", "llama", "none", "fp16", "sm_90", 1536)]["divisible_by_16"]


@needs_backend
def test_bf16_store_and_helpers_checks(full_sweep):
    r = full_sweep[0]
    check = r["bf16_store_check"]
    assert len(check) == 12 and not any("error" in b for b in check)
    for b in check:
        assert b["gpu_path_out_bf16"] == 0  # compiled for a GPU, the launch takes the plain cvt store
        assert b["store_bits_cvt"] == b["store_bits_bits"] == 128 and b["spill_cvt"] == b["spill_bits"] == 0
        assert b["sass_cvt"] < b["sass_bits"]  # the bit-level rounding is real work on a GPU
    hc = r["helpers_check"]
    assert hc and len(hc["kernels"]) == 3 and "error" not in hc
    for k in hc["kernels"]:
        # the kernels call the shared device functions, and the compiled binaries have them inlined
        assert k["type"] == "JITFunction" and {"apply_map", "store_row"} <= set(k["helpers"])
        assert k["calls"] == 0 and k["funcs"] == 0


# --------------------------------------------------------------------------------------------------
# the gate bites
# --------------------------------------------------------------------------------------------------
@needs_backend
def test_gate_fails_on_a_spilling_and_a_32_bit_variant(tmp_path, aot_cache):
    odd = {"kernel": "affine", "dtype": "bf16", "arch": 90, "width": 4100, "map": "uniform", "family": None}
    cfg = A.AOTConfig(out=tmp_path, archs=(90,), kernels=("affine",), dtypes=("bf16",), widths=(4096,),
                      inject=("spill", "unaligned"), extra_variants=[odd], jobs=JOBS, cache_dir=aot_cache,
                      bf16_check=False, helpers_check=False, progress=False, log=lambda *a: None)
    r = A.run_aot(cfg)
    assert r["gate"] == "FAIL"
    by = {(v["kernel"], v["width"], v.get("inject")): v for v in r["variants"]}
    spill = by[("add_rmsnorm", 8192, "spill")]
    assert spill["status"] == "FAIL" and spill["num_warps"] == 1 and spill["spill_bytes"] > 0
    assert any("spill" in p for p in spill["problems"])
    narrow = by[("affine", 4096, "unaligned")]
    assert narrow["status"] == "FAIL" and narrow["load_bits"] < 128 and narrow["store_bits"] < 128
    assert any("expected 128-bit" in p for p in narrow["problems"])
    # the same kernel with the launch's specialization passes ...
    assert by[("affine", 4096, None)]["status"] == "pass" and by[("affine", 4096, None)]["load_bits"] == 128
    # ... and a row that really is unaligned (W not divisible by 16) is narrow but not gated
    o = by[("affine", 4100, None)]
    assert o["status"] == "pass" and o["load_bits"] == 16 and not o["width_gated"]
    assert "not divisible by 16" in o["not_gated_because"]


@needs_backend
def test_cli_exit_status(tmp_path, monkeypatch, capsys, aot_cache):
    monkeypatch.setenv("FUSESTEER_CACHE", str(aot_cache.parent))
    monkeypatch.setattr(A, "default_cache_dir", lambda: aot_cache)
    monkeypatch.setattr(A, "MODELS", (("Llama-3-8B", "llama", 4096, 14336, 4096),))
    rc = A.main(["--out", str(tmp_path), "--archs", "90", "--dtypes", "bf16", "--inject", "spill", "--jobs", "1",
                 "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1 and "aot gate: FAIL" in out and "inject=spill" in out
    assert json.loads((tmp_path / "aot.json").read_text())["gate"] == "FAIL"
    rc = A.main(["--out", str(tmp_path), "--archs", "90", "--dtypes", "bf16", "--jobs", "1", "--no-progress"])
    assert rc == 0 and "aot gate: PASS" in capsys.readouterr().out


def test_cli_usage_errors(tmp_path, capsys):
    """Options of the dev tool only; a bad value is a usage error (exit 2) before anything compiles."""
    with pytest.raises(SystemExit) as e:
        A.main(["--dtypes", "int8", "--out", str(tmp_path)])
    assert e.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert A.main(["--out", str(tmp_path / "a-file")]) == 2
    assert "bench.aot: error: output folder" in capsys.readouterr().err
    help_text = A.build_parser().format_help()
    assert "--archs" in help_text and "--inject" in help_text and "--budget" not in help_text
    assert A.DEFAULT_OUT == A.CHECKOUT / "bench" / "results" / "aot"


def test_module_runs_from_the_checkout_root():
    """The one spelling: `python -m bench.aot` from the checkout's root (here: its --help)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "bench.aot", "--help"], cwd=A.CHECKOUT, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(A.FUSESTEER_PARENT)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: python -m bench.aot") and "--archs" in r.stdout


def test_ptx_access_attribution():
    ptx = """
    .visible .entry k(.param .u64 k_param_0, .param .u64 k_param_1, .param .u64 k_param_2, .param .u32 k_param_3)
    {
    ld.param.b64 %rd1, [k_param_0];
    ld.param.b64 %rd2, [k_param_1];
    ld.param.b64 %rd3, [k_param_2];
    ld.param.b32 %r1, [k_param_3];
    mov.u32 %r2, %tid.x;
    mul.wide.u32 %rd4, %r2, 16;
    add.s64 %rd5, %rd1, %rd4;
    @%p1 ld.global.v4.b32 { %r3, %r4, %r5, %r6 }, [ %rd5 + 0 ];
    ld.global.b32 { %r7 }, [ %rd3 + 0 ];
    mad.wide.s32 %rd6, %r7, %r1, %rd2;
    ld.global.b16 { %rs1 }, [ %rd6 + 0 ];
    st.global.v2.b32 [ %rd5 + 0 ], { %r3, %r4 };
    }
    """
    acc = P.access_widths(ptx, ["x_ptr", "t_ptr", "slot_ptr", "W"])
    got = [(a["kind"], a["bits"], [n for n in a["args"] if n.endswith("_ptr")]) for a in acc]
    # the table load is addressed by a loaded slot: attributed to the table, not to the slot pointer
    assert got == [("load", 128, ["x_ptr"]), ("load", 32, ["slot_ptr"]), ("load", 16, ["t_ptr"]),
                   ("store", 64, ["x_ptr"])]
    log = "    0 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\nptxas info : Used 48 registers"
    assert P.ptxas_facts(log) == {"stack_frame": 0, "spill_stores": 8, "spill_loads": 8, "regs": 48}


# --------------------------------------------------------------------------------------------------
# roofline (a prediction)
# --------------------------------------------------------------------------------------------------
def test_roofline_numbers():
    assert RL.predicted_us(TR.call_bytes(TR.kernel_bytes("add_rmsnorm", "bf16", 4096, "uniform", "llama"), 1,
                                         "uniform"), 3.35) == pytest.approx(0.022, rel=1e-2)
    rows = RL.decode_table()
    assert [(d["batch"], d["plans"]) for d in rows] == [(1, 1), (8, 1), (8, 8), (64, 1), (64, 8)]
    ratio = {(d["batch"], d["plans"]): d["predicted_ratio"] for d in rows}
    assert all(1.0 < x < 1.01 for x in ratio.values())
    assert ratio[(1, 1)] < ratio[(8, 1)] < ratio[(8, 8)] and ratio[(8, 1)] < ratio[(64, 1)] < ratio[(64, 8)]
    assert rows[0]["predicted_ratio"] == pytest.approx(1 + 32 * (2 * 4 * (4096 + 14336 + 4096) + 2 * 4096 * 2)
                                                       / TR.LLAMA3_8B.step_weight_bytes())
    assert rows[0]["predicted_vanilla_us"]["H100"] == pytest.approx(15.01e9 / 3.35e12 * 1e6, rel=1e-3)
    md = "\n".join(RL.markdown())
    assert "PREDICTION" in md and "H200" in md
