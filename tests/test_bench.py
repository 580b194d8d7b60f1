"""The bench command (`fusesteer bench SUITE`): the quick parity gate passes on the current code and fails on an
injected regression; the quick latency suite runs and writes its outputs; the thresholds are the tests' thresholds;
each suite has its own options."""

import json
import re
from pathlib import Path

import pytest  # noqa: E402
import torch  # noqa: E402

import fusesteer.bench as bench  # noqa: E402
from fusesteer import tolerances as TH  # noqa: E402
from fusesteer.bench.options import VERBS  # noqa: E402
from fusesteer.cli import main as cli_main  # noqa: E402


def _load(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def quick_parity(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-parity")
    rc = cli_main(["bench", "parity", "--quick", "--out", str(out)])
    return rc, out


def test_quick_parity_gate_passes_and_writes_outputs(quick_parity):
    rc, out = quick_parity
    doc = _load(out / "parity.json")
    res = doc["result"]
    bad = [(r["model"], r["dtype"], r["plan"], r["arm"], r.get("reason")) for r in res["rows"]
           if r["status"] in ("FAIL", "ERROR", "vacuous")]
    assert rc == 0 and res["ok"], bad
    rows = res["rows"]
    passed = {(r["family"], r["dtype"], r["arm"]) for r in rows if r["status"] == "pass"}
    for fam in ("llama", "gemma2", "gemma3", "qwen2", "qwen3"):
        for arm in ("torch", "auto"):
            assert (fam, "fp32", arm) in passed and (fam, "bf16", arm) in passed, (fam, arm)
    assert ("llama", "fp32", "fold") in passed and ("llama", "int8", "torch") in passed
    if bench.INTERPRETER_AT_IMPORT:
        assert ("gemma3", "fp32", "triton") in passed
    # every passing row really compared something: a non-trivial plan effect and the tests' tolerance
    for r in rows:
        if r["status"] == "pass":
            assert r["effect"] > TH.MIN_EFFECT
            assert r["max_abs"] <= TH.logit_tolerance(r["dtype"], r["arm"], r["ref_absmax"])
            assert len(r["layer_err"]) == (4 if r["family"] == "gemma3" else 3)
    # fold refuses what cannot fold, with the reason
    fold_na = [r for r in rows if r["arm"] == "fold" and r["plan"] == "per-row"]
    assert fold_na and all(r["status"] == "n/a" and "per-row" in r["reason"] for r in fold_na)
    assert doc["machine"]["cpu_model"] and doc["machine"]["versions"]["torch"] == torch.__version__
    md = (out / "report.md").read_text()
    assert "## Parity (quick)" in md and "| tiny-gemma2 | bf16 | affine | torch | pass |" in md
    assert (out / "parity_layers.png").stat().st_size > 1000


def test_quick_parity_gate_fails_on_injected_regression(tmp_path, monkeypatch, capsys):
    from fusesteer.runtime.backends import torch as fused

    real = fused.TorchBackend.apply

    def perturbed(x, table, router):
        return real(x, table, router) + 1e-3

    monkeypatch.setattr(fused.TorchBackend, "apply", staticmethod(perturbed))
    rc = cli_main(["bench", "parity", "--quick", "--families", "llama", "--dtypes", "fp32", "--arms", "torch",
                     "--out", str(tmp_path)])
    assert rc == 1
    rows = _load(tmp_path / "parity.json")["result"]["rows"]
    assert rows and all(r["status"] == "FAIL" and r["arm"] == "torch" for r in rows)
    assert all(r["max_abs"] > TH.FP32_ABS for r in rows)
    assert "parity gate: FAIL" in capsys.readouterr().out


def test_quick_latency_runs_and_reports(tmp_path):
    rc = cli_main(["bench", "latency", "--quick", "--out", str(tmp_path), "--cycles", "5", "--prefill-cycles", "5",
                     "--scenarios", "blend+gains", "per-row", "--arms", "torch", "fold", "auto", "reference"])
    assert rc == 0
    doc = _load(tmp_path / "latency.json")
    res = doc["result"]
    assert res["mode"] == "quick" and res["config"]["decode_cycles"] == 5
    got = {(s["scenario"], s["batch"]) for s in res["scenarios"]}
    assert got == {("blend+gains", 1), ("blend+gains", 8), ("per-row", 8)}
    for s in res["scenarios"]:
        for phase in ("decode", "prefill"):
            arms = s["phases"][phase]["arms"]
            assert arms["vanilla"]["n"] == 5 and arms["vanilla"]["median_ms"] > 0
            assert arms["torch"]["ratio_median"] > 0 and arms["torch"]["ratio_ci_low"] <= arms["torch"]["ratio_median"]
    assert {t["target"] for t in res["targets"]} == {"fused", "folded", "per_row"}
    assert not any(t["meaningful"] for t in res["targets"])
    if not torch.cuda.is_available():
        assert res["compiled"][0]["status"] == "skipped" and "NOT run" in res["compiled"][0]["reason"]
    assert (tmp_path / "latency_ratios.png").stat().st_size > 1000
    assert "### Targets" in (tmp_path / "report.md").read_text()


def test_thresholds_are_the_tests_thresholds():
    assert TH.logit_tolerance("fp32", "torch", 50.0) == 1e-5
    assert TH.logit_tolerance("int8", "torch", 50.0) == 1e-4
    assert TH.logit_tolerance("bf16", "torch", 10.0) == pytest.approx(0.02 * 10 + 1e-2)
    assert TH.logit_tolerance("bf16", "triton", 10.0) == pytest.approx(0.03 * 10 + 2e-2)
    assert TH.tokens_must_agree("fp32") and not TH.tokens_must_agree("bf16")
    with pytest.raises(ValueError, match="no parity threshold"):
        TH.logit_tolerance("fp64", "torch", 1.0)


def test_cli_usage_errors(capsys):
    assert cli_main(["bench", "latency", "--quick", "--cycles", "3"]) == 2
    assert "at least 5 timed cycles" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli_main(["bench", "parity", "--quick", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["bench", "parity", "--dtypes", "fp64"])
    with pytest.raises(SystemExit):  # a latency option is not a parity option
        cli_main(["bench", "parity", "--quick", "--cycles", "5"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli_main(["bench", "aot"])  # the AOT check is developer tooling: `python -m bench.aot` in a checkout
    assert "invalid choice: 'aot'" in capsys.readouterr().err


def test_each_suite_has_its_own_options(capsys):
    def help_of(*argv) -> str:
        with pytest.raises(SystemExit) as e:
            cli_main(["bench", *argv, "--help"])
        assert e.value.code == 0
        return capsys.readouterr().out

    assert set(VERBS) == {"parity", "latency", "all", "gpu", "serve"}
    top = help_of()
    assert all(v in top for v in VERBS) and "aot" not in top
    opts = {v: set(re.findall(r"(--[a-z][a-z-]+)", help_of(v))) for v in VERBS}
    latency_only = {"--cycles", "--prefill-cycles", "--warmup", "--scenarios", "--batches", "--phases", "--protocol",
                    "--compiled", "--check-finite", "--progress"}
    parity_only = {"--steps", "--dtypes", "--families", "--all-triton"}
    assert latency_only <= opts["latency"] and not parity_only & opts["latency"]
    assert parity_only <= opts["parity"] and not latency_only & opts["parity"]
    assert opts["all"] >= latency_only | parity_only
    assert {"--dry-run", "--budget"} <= opts["gpu"] and not (parity_only | {"--scenarios", "--quick"}) & opts["gpu"]
    assert {"--clients", "--rounds", "--arm-time-cap", "--quick"} <= opts["serve"]
    for v, o in opts.items():  # the AOT tool's options are nowhere, the GPU ones only on gpu, serve's only on serve
        assert not {"--archs", "--inject", "--jobs", "--no-cache"} & o, v
        assert v == "gpu" or not {"--dry-run", "--budget"} & o, v
        assert v == "serve" or not {"--clients", "--arm-time-cap"} & o, v


def test_serve_usage_error_before_any_server(capsys, tmp_path):
    assert cli_main(["bench", "serve", "--clients", "0", "--out", str(tmp_path)]) == 2
    assert "--clients and --requests must be >= 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_quick_latency_copies_protocol(tmp_path):
    rc = cli_main(["bench", "latency", "--quick", "--protocol", "copies", "--out", str(tmp_path), "--cycles", "5",
                     "--prefill-cycles", "5", "--scenarios", "additive", "--batches", "2", "--arms", "torch", "hook",
                     "--no-plots"])
    assert rc == 0
    res = _load(tmp_path / "latency-copies.json")["result"]
    assert res["config"]["protocol"] == "copies"
    (sc,) = res["scenarios"]
    assert sc["batch"] == 2 and set(sc["arms"]) == {"vanilla", "vanilla-2", "hook", "torch"}
    assert sc["phases"]["decode"]["arms"]["vanilla-2"]["n"] == 5  # the A/A control arm
    assert sc["phases"]["decode"]["arms"]["torch"]["n"] == 5
    assert "torch/hook" in sc["phases"]["decode"]["cross"]


def test_serve_summary_ratios_from_hand_made_rounds(tmp_path):
    """`bench serve`'s summary: steered / unsteered, vs the peer and vs the --versus server, pooled over the
    rounds (tokens / wall time) and per paired round, from arms written by hand."""
    import argparse

    from fusesteer.bench import serve as S

    def arm(name, rnd, tokens, wall, requests=8):
        return {"clients": 8, "arm": name, "round": rnd, "requests": requests, "tokens": tokens, "wall_s": wall,
                "tokens_per_s": tokens / wall, "_ttft": [0.1], "_itl": [0.05, 0.07]}

    arms = [arm("unsteered", 0, 256, 4.0), arm("steered", 0, 256, 5.0), arm("unsteered [--compile]", 0, 256, 2.0),
            arm("steered [--compile]", 0, 256, 2.5), arm("transformers", 0, 168, 4.2),
            arm("unsteered", 1, 256, 4.0), arm("steered", 1, 256, 4.0), arm("unsteered [--compile]", 1, 256, 3.2),
            arm("steered [--compile]", 1, 256, 3.2), arm("transformers", 1, 168, 4.2)]
    args = argparse.Namespace(clients=[8], peer="transformers", versus="--compile", sequential_clients=8)
    res = {"model": "m", "arms": arms, "machine": {"cpu_model": "cpu", "device": "cpu"}}
    assert S._finish(res, args, tmp_path) == 0
    summ = _load(tmp_path / "serve.json")["summary"]
    st = summ["tokens_per_s_ratio_steered_vs_unsteered"]["8"]
    assert st["rounds"] == [0.8, 1.0] and st["median_of_rounds"] == 0.9 and st["pooled"] == round(8 / 9, 3)
    vs = summ["tokens_per_s_versus"]["8"]
    assert vs["unsteered"]["rounds"] == [2.0, 1.25] and vs["unsteered"]["pooled"] == round(8 / 5.2, 3)
    assert vs["steered / unsteered [--compile]"]["rounds"] == [0.8, 1.0]
    peer = summ["tokens_per_s_vs_peer"]["8"]
    assert peer["unsteered"]["rounds"] == [1.6, 1.6] and peer["steered"]["pooled"] == round((512 / 9) / 40, 3)
    assert peer["tokens_per_request"] == {"unsteered": 32.0, "steered": 32.0, "transformers": 21.0}
    assert peer["steered [--compile]"]["rounds"] == [2.56, 2.0]
