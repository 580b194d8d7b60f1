"""Steering under transformers' tensor parallelism (``tp_plan="auto"``), on CPU with gloo under torchrun.

Each case runs ``tests/tp_worker.py`` on N processes against a tiny model saved to a folder: for every backend,
the tensor-parallel model steered with per-row plans (prompt / generated gating, unsteered rows, left padding,
explicit prompt lengths) equals the same plans on one process (fp32 logits within the suite's tolerance,
identical greedy tokens); fold folds gains exactly and refuses a bias with a reason; detach restores every
rank's shard bit for bit; add_plan / route / update / remove_plan on a live handle; a plan broadcast from rank 0;
AUSteer localization on the TP model picks the units it picks on one process.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from serve_helpers import free_port  # noqa: E402

from fusesteer.testing import tiny

WORKER = Path(__file__).with_name("tp_worker.py")
CASES = [  # (family, processes, overrides, triton too)
    ("llama", 2, {}, True),
    ("qwen3", 2, {}, False),  # grouped-query attention
    ("gemma3", 2, {}, False),  # sandwich norms
    ("qwen3_moe", 2, {}, False),  # sparse MoE layers
    ("llama", 4, {"num_key_value_heads": 4}, False),  # 4 ranks: every kv head on its own rank
]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.mark.parametrize("family, nproc, overrides, triton", CASES,
                         ids=[f"{c[0]}-tp{c[1]}" for c in CASES])
def test_tensor_parallel_steering_equals_one_process(tmp_path, family, nproc, overrides, triton):
    folder = tmp_path / "model"
    tiny(family, **overrides).save_pretrained(folder)
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), str(WORKER), str(folder), str(out)]
    cmd += ["--triton"] if triton else []
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    errors = sorted(glob.glob(f"{out}.load-error.*"))
    if errors:
        pytest.skip(f"this transformers release cannot shard tiny {family} with tp_plan='auto' on CPU: "
                    f"{Path(errors[0]).read_text()[:200]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    res = json.loads(out.read_text())
    assert res["world"] == nproc and res["parallel"]
    assert res["unsteered_max_abs"] <= 1e-5
    bad = {k: v for k, v in res["checks"].items() if not v["ok"]}
    assert not bad, bad
    want = {"rows/reference", "rows/torch", "rows/auto", "plen/torch", "fold/gains", "fold/bias refused",
            "detach/bit-exact", "live/add+route", "live/update", "live/remove+add", "broadcast_plan",
            "austeer/head", "austeer/ffn"} | ({"rows/triton"} if triton else set())
    assert want <= set(res["checks"])
