"""Plan builders tell the user what happened: a sweep's reproduce command, the one pair rule of build and
sweep, pair-shortfall and grid-edge warnings, dataset help generated from what ships, eval's load time and
first-conversion notice (tiny models, no downloads)."""

from __future__ import annotations

import json

import pytest
import torch
from test_austeer import mc, model_dir, tok, yn  # noqa: F401 - fixtures shared with the AUSteer tests

from fusesteer import cli
from fusesteer.commands import common
from fusesteer.evaluate import datasets as D
from fusesteer.methods import sweep as SW
from fusesteer.runtime.plan import SteeringPlan

torch.set_num_threads(1)


def _same_plan(a: SteeringPlan, b: SteeringPlan) -> None:
    assert len(a.entries) == len(b.entries) > 0
    for e, w in zip(a.entries, b.entries):
        assert (e.layer, e.site) == (w.layer, w.site)
        for x, y in ((e.a, w.a), (e.b, w.b), (e.dims, w.dims)):
            assert (x is None) == (y is None)
            if x is not None:
                assert torch.equal(torch.as_tensor(x), torch.as_tensor(y))
    skip = {"localization_seconds"}
    assert {k: v for k, v in a.metadata.items() if k not in skip} == \
        {k: v for k, v in b.metadata.items() if k not in skip}


@pytest.mark.parametrize("verb,grid", [
    ("austeer", ["--site", "ffn", "--k", "2", "4", "--alpha", "1", "5"]),
    ("baseline", ["--method", "caa", "--layer", "0", "1", "--scale", "1", "4"]),
])
def test_sweep_reproduce_command_rebuilds_identical_plan(model_dir, tmp_path, capsys, verb, grid):  # noqa: F811
    out = tmp_path / "sw"
    rc = cli.main([verb, "sweep", "--model", str(model_dir), "--dataset", "strategyqa", "--val", "6",
                   "--pairs", "10", *grid, "--out", str(out), "--save-best", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    rep = data["reproduce"]
    assert rep["argv"][:3] == ["fusesteer", verb, "build"] and rep["plan"] == str(out / "best_plan.safetensors")
    assert rep["command"] in (out / "results.md").read_text()
    assert "--offset 6" in rep["command"]  # pairs after the validation slice, said explicitly
    argv = list(rep["argv"][1:])
    argv[argv.index("-o") + 1] = str(tmp_path / "rebuilt.safetensors")
    assert cli.main(argv + ["--quiet"]) == 0
    _same_plan(SteeringPlan.load(tmp_path / "rebuilt.safetensors"), SteeringPlan.load(out / "best_plan.safetensors"))
    best = data["best"]
    got = SteeringPlan.load(tmp_path / "rebuilt.safetensors").metadata
    if verb == "austeer":
        assert (got["k"], got["alpha"]) == (best["k"], best["alpha"])


def test_build_and_sweep_localize_on_the_same_records(model_dir, tmp_path, capsys):  # noqa: F811
    """One rule: build without --offset skips the first --val records, as sweep does; build --help says so."""
    rc = cli.main(["austeer", "sweep", "--model", str(model_dir), "--dataset", "strategyqa", "--val", "7",
                   "--pairs", "9", "--k", "3", "--alpha", "2", "--out", str(tmp_path / "sw"), "--quiet"])
    assert rc == 0
    sweep_pairs = json.loads((tmp_path / "sw" / "results.json").read_text())["info"]["pairs"]
    rc = cli.main(["austeer", "build", "--model", str(model_dir), "--dataset", "strategyqa", "--val", "7",
                   "--pairs", "9", "--k", "3", "--alpha", "2", "-o", str(tmp_path / "p.safetensors"), "--quiet"])
    assert rc == 0
    build_pairs = SteeringPlan.load(tmp_path / "p.safetensors").metadata["data"]
    assert build_pairs["first_record"] == sweep_pairs["first_record"] == 7
    assert build_pairs["ids_sha256"] == sweep_pairs["ids_sha256"]
    # default --val is the same in both verbs: build alone never localizes on sweep's default validation slice
    parser = cli.build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    for verb in ("austeer", "baseline"):
        actions = verbs[verb]._subparsers._group_actions[0].choices
        for action in ("build", "sweep"):
            helptext = " ".join(actions[action].format_help().split())
            assert "Which records localize (build and sweep alike)" in helptext, (verb, action)
            defaults = {a.dest: a.default for a in actions[action]._actions}
            assert defaults["val"] == 60 and defaults["offset"] is None
    # an --offset inside the validation slice is refused
    rc = cli.main(["austeer", "sweep", "--model", str(model_dir), "--dataset", "strategyqa", "--val", "7",
                   "--offset", "3", "--k", "3", "--alpha", "2", "--out", str(tmp_path / "x"), "--quiet"])
    assert rc == 2 and "would localize on the validation records 0..6" in capsys.readouterr().err


def test_pair_shortfall_is_warned_in_output_and_json(model_dir, tmp_path, capsys):  # noqa: F811
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in D.load_dataset("strategyqa", limit=14)))
    rc = cli.main(["austeer", "sweep", "--model", str(model_dir), "--dataset", str(small), "--val", "5",
                   "--pairs", "20", "--k", "2", "--alpha", "1", "--out", str(tmp_path / "sw"), "--quiet"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "warning: --pairs 20 asked, 9 used: records 5..13" in err and "records 0..4 are held out" in err
    data = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert data["info"]["pairs"]["shortfall"] == 11 and data["info"]["pairs"]["requested"] == 20
    assert any(w.startswith("--pairs 20 asked, 9 used") for w in data["warnings"])
    assert "warning: --pairs 20 asked" in (tmp_path / "sw" / "results.md").read_text()
    rc = cli.main(["austeer", "build", "--model", str(model_dir), "--dataset", str(small), "--val", "5",
                   "--pairs", "20", "--k", "2", "-o", str(tmp_path / "p.safetensors"), "--quiet"])
    assert rc == 0 and "warning: --pairs 20 asked, 9 used" in capsys.readouterr().err
    assert SteeringPlan.load(tmp_path / "p.safetensors").metadata["warnings"][0].startswith("--pairs 20 asked")
    # enough records: no warning, no shortfall field
    rc = cli.main(["austeer", "build", "--model", str(model_dir), "--dataset", str(small), "--val", "5",
                   "--pairs", "4", "--k", "2", "-o", str(tmp_path / "q.safetensors"), "--quiet"])
    assert rc == 0 and "warning" not in capsys.readouterr().err
    assert "shortfall" not in SteeringPlan.load(tmp_path / "q.safetensors").metadata["data"]


def test_next_values_and_grid_edges_by_hand():
    assert SW.next_values([5, 10, 20, 50, 100], "high") == [200, 400]
    assert SW.next_values([1.0, 5.0, 10.0, 20.0, 50.0, 100.0], "low", lo=0) == [0.2, 0.04]
    assert SW.next_values([2, 4], "low", lo=1) == [1]  # 0.5 rounds to 0 < lo: dropped
    assert SW.next_values([1, 4], "low", lo=1) == []  # k = 1 is a hard bound
    assert SW.next_values([6, 12, 18], "high", hi=29, additive=True) == [24]
    assert SW.next_values([8.0, 15.0], "high") == [28.1, 52.7]  # three significant digits
    r = SW.SweepResult("m", "k", "alpha", [5, 10, 20], [1.0, 5.0, 10.0],
                       [[0.5, 0.6, 0.5], [0.5, 0.6, 0.5], [0.5, 0.6, 0.9]], [[0] * 3] * 3, 10,
                       bounds={"k": {"lo": 1, "hi": 20}, "alpha": {"lo": 0}})
    assert (r.best["k"], r.best["alpha"]) == (20, 10.0)
    assert r.edges == [{"axis": "alpha", "edge": "high", "value": 10.0, "grid": [1.0, 10.0], "suggest": [20.0, 40.0]}]
    r.bounds = {}
    assert [e["axis"] for e in r.edges] == ["k", "alpha"]
    assert r.all_warnings[0] == ("best k=20 is the largest value of its grid (5..20); a larger value might be "
                                 "better: try --k 40 80")
    interior = SW.SweepResult("m", "k", "alpha", [5, 10, 20], [1.0, 5.0, 10.0],
                              [[0.5, 0.5, 0.5], [0.5, 0.9, 0.5], [0.5, 0.5, 0.5]], [[0] * 3] * 3, 10)
    assert interior.edges == [] and interior.all_warnings == []
    one = SW.SweepResult("m", "k", "alpha", [5], [1.0], [[0.5]], [[1]], 2)  # nothing searched, nothing flagged
    assert one.edges == []


def test_grid_edge_warnings_in_output_and_json(model_dir, tmp_path, capsys):  # noqa: F811
    """Two values per axis: the best cell is always on an edge of both (k down to 1 and alpha are open)."""
    rc = cli.main(["austeer", "sweep", "--model", str(model_dir), "--dataset", "strategyqa", "--val", "6",
                   "--pairs", "8", "--k", "2", "4", "--alpha", "1", "5", "--out", str(tmp_path / "sw"), "--quiet"])
    assert rc == 0
    err = capsys.readouterr().err
    data = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert [e["axis"] for e in data["grid_edges"]] == ["k", "alpha"]
    for e in data["grid_edges"]:
        assert e["value"] == data["best"][e["axis"]] and e["suggest"]
        msg = SW.edge_message(e)
        assert msg in data["warnings"] and f"warning: {msg}" in err
        assert f"--{e['axis']} " in msg
    assert "- warning: best k=" in (tmp_path / "sw" / "results.md").read_text()


def test_dataset_help_is_generated_from_what_ships(model_dir, capsys):  # noqa: F811
    kinds = D.bundled_kinds()
    assert kinds == {"strategyqa": "yesno", "truthfulqa_mc": "mc", "cause_effect": "mc", "freshqa": "open"}
    parser = cli.build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    helps = {"eval": verbs["eval"].format_help(),
             "austeer": verbs["austeer"]._subparsers._group_actions[0].choices["build"].format_help(),
             "baseline": verbs["baseline"]._subparsers._group_actions[0].choices["sweep"].format_help(),
             "fusion": verbs["fusion"]._subparsers._group_actions[0].choices["optimize"].format_help()}
    for verb, text in helps.items():
        text = " ".join(text.split())
        for name, kind in kinds.items():
            assert f"{name} ({D.KIND_LABELS[kind]}" in text, (verb, name)
        if verb != "fusion":
            assert "freshqa (open: fusion)" in text
    rc = cli.main(["eval", "--model", str(model_dir), "--dataset", "freshqa", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "freshqa holds open records" in err and "`fusesteer fusion`" in err
    rc = cli.main(["austeer", "build", "--model", str(model_dir), "--dataset", "freshqa", "-o", "x.safetensors",
                   "--quiet"])
    assert rc == 2 and "`fusesteer austeer` takes yes/no or choice datasets" in capsys.readouterr().err


def test_eval_reports_load_time_apart(model_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "e.json"
    rc = cli.main(["eval", "--model", str(model_dir), "--dataset", "cause_effect", "--limit", "4", "--json",
                   str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["load_seconds"] > 0 and res["scoring_seconds"] == pytest.approx(res["elapsed_s"], abs=1e-3)
    assert f"model load {res['load_seconds']:.1f} s" in text and "scoring time (s)" in text


def test_first_conversion_notice_even_when_quiet(monkeypatch, capsys):
    from fusesteer import models

    calls = []
    monkeypatch.setitem(models.KNOWN, "fake-embedded", {"layers": 1})
    monkeypatch.setattr(models, "load", lambda name, **kw: calls.append(kw) or ("model", "tok"))
    marker = {"state": None}
    monkeypatch.setattr(models, "cache_marker", lambda name: marker["state"])
    assert common.load_model("fake-embedded", quiet=True)[:2] == ("model", "tok")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "first use of fake-embedded: converting its GGUF once" in err
    assert calls[-1]["progress"] is False
    marker["state"] = {"format": 1}  # converted already: silent
    common.load_model("fake-embedded", quiet=True)
    assert capsys.readouterr().err == ""
    common.load_model("fake-embedded", quiet=False)  # not quiet: models.load prints its own progress
    assert capsys.readouterr().err == "" and calls[-1]["progress"] is True
