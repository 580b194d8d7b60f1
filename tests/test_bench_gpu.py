"""`fusesteer bench gpu` without a GPU: the dry run, its usage errors, the run's own code end to end on CPU with
stand-ins, and the traffic model (bytes per kernel call and per decode step) its GB/s and predicted ratios use."""

from __future__ import annotations

import pytest
import torch

from fusesteer.bench import traffic as TR
from fusesteer.cli import main as cli_main


def test_traffic_bytes():
    b = TR.kernel_bytes("add_rmsnorm", "bf16", 4096, "uniform", "llama")
    assert b == {"per_row": 4 * 4096 * 2, "fixed": 4096 * 2, "table": 2 * 4096 * 4}
    assert TR.call_bytes(b, 1, "uniform") == 73728
    assert TR.call_bytes(TR.kernel_bytes("affine", "fp32", 4096, "per-row"), 64, "per-row") == \
        64 * 2 * 4096 * 4 + 8 * 2 * 4096 * 4
    assert TR.kernel_bytes("add_rmsnorm", "fp32", 64, "none", "gemma") == {"per_row": 4 * 64 * 4,
                                                                          "fixed": 2 * 64 * 4, "table": 0}
    with pytest.raises(ValueError, match="map must be"):
        TR.kernel_bytes("glu", "bf16", 64, "rows")
    assert TR.LLAMA3_8B.step_weight_bytes() == pytest.approx(15.01e9, rel=1e-3)
    added = 32 * (2 * 4 * (4096 + 14336 + 4096) + 2 * 4096 * 2)
    assert TR.steered_added_bytes(TR.LLAMA3_8B, 1, 1)["step"] == added
    assert TR.predicted_ratio(TR.LLAMA3_8B, 1, 1) == (TR.LLAMA3_8B.step_weight_bytes() + added) / \
        TR.LLAMA3_8B.step_weight_bytes()
    assert TR.predicted_ratio(TR.LLAMA3_8B, 8, 8) > TR.predicted_ratio(TR.LLAMA3_8B, 8, 1) > 1.0


def test_bench_gpu_dry_run_on_cpu(capsys):
    assert cli_main(["bench", "gpu", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "bench gpu --dry-run" in out and "nothing is timed" in out
    for step in ("kernel parity", "kernel bandwidth", "smollm2-135m: blend+gains batch 1: eager",
                 "gemma3-270m: per-row batch 8: CUDA graphs + zero-recompile", "write results"):
        assert step in out, step
    assert "kernel parity inputs on CPU" in out


def test_bench_gpu_without_cuda_is_a_usage_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert cli_main(["bench", "gpu"]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_bench_gpu_usage_errors(capsys):
    for argv, msg in ((["--device", "cpu"], "runs on a CUDA device"), (["--budget", "0"], "--budget must be positive"),
                      (["--cycles", "3"], "--cycles must be >= 5")):
        assert cli_main(["bench", "gpu", "--dry-run", *argv]) == 2, argv
        assert msg in capsys.readouterr().err, argv


def test_bench_gpu_pipeline_smoke_on_cpu(tmp_path):
    """The GPU run's own code end to end on CPU with stand-ins (tiny model, torch backend, kernels in torch
    mode, torch.compile with the eager backend): results, the zero-recompile check, JSON and PNG."""
    from fusesteer.bench.gpu import GPUConfig, run_gpu

    cfg = GPUConfig(device="cpu", models=("tiny-llama",), dtype="fp32", backend="torch", compile_mode=None,
                    compile_backend="eager", kernel_mode="torch", kernel_cases=4, bandwidth=False, cycles=5,
                    warmup=1, scenarios=(("per-row", 8),), out=tmp_path, progress=False, log=lambda *a: None)
    r = run_gpu(cfg)
    assert r["ok"], r
    (sc,) = r["models"]["tiny-llama"]["scenarios"]
    assert sc["model parity"]["ok"] and sc["eager"]["steered"]["n"] == 5
    assert sc["compiled"]["zero_recompile"] == "pass" and sc["compiled"]["update_changed_logits"]
    assert (tmp_path / "gpu-cpu-smoke.json").is_file() and (tmp_path / "gpu-cpu-smoke.png").is_file()
