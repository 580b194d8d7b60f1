"""CLI verbs `fusesteer plan show|convert` and `fusesteer generate`, through fusesteer.cli.main."""

import json
import re

import numpy as np
import pytest
import torch

import fusesteer as fs
from fusesteer.cli import main
from fusesteer.interop.gguf_cv import read_control_vector

VERBS = [["demo"], ["plan"], ["plan", "show"], ["plan", "convert"], ["generate"]]


# ------------------------------------------------------------------------------------------------
# fixtures


def _word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", bos_token="<s>", eos_token="</s>",
                                   unk_token="[UNK]")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama + WordLevel tokenizer saved as a local HF folder (what `--model PATH` loads)."""
    from fusesteer.testing import tiny

    d = tmp_path_factory.mktemp("tiny-llama")
    model = tiny("llama", seed=1)
    model.save_pretrained(d)
    _word_tokenizer(model.config.vocab_size).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def spec(tiny_dir):
    from fusesteer.models import load

    model, _ = load(str(tiny_dir))
    return fs.ModelSpec.from_model(model)


def _plan(spec, seed=0, layers=(1, 2), scale=3.0):
    g = torch.Generator().manual_seed(seed)
    p = fs.SteeringPlan(spec, name="cli-test", notes="made in a test")
    for layer in layers:
        p.add(layer=layer, site="layer.out", b=scale * torch.randn(spec.hidden_size, generator=g))
    p.metadata = {"method": "test", "seed": seed}
    return p


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------------------------
# help


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: " ".join(v))
def test_every_verb_has_help_with_an_example(capsys, verb):
    with pytest.raises(SystemExit) as exc:
        main(verb + ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and "fusesteer " + verb[0] in out


# ------------------------------------------------------------------------------------------------
# plan show


def test_plan_show_safetensors(capsys, tmp_path, spec):
    plan = _plan(spec)
    plan.add(layer=0, site="mlp.down_proj.in", a=torch.full((2,), 1.5), dims=[3, 9], gating="generated")
    path = tmp_path / "p.safetensors"
    plan.save(path)
    rc, out, _ = run(capsys, "plan", "show", path)
    assert rc == 0
    assert spec.fingerprint() in out and "cli-test" in out and "made in a test" in out
    rows = [ln.split() for ln in out.splitlines() if re.match(r"^\s+\d+\s+\d+\s+\S+\.", ln)]
    assert [(r[1], r[2], r[3]) for r in rows] == [("1", "layer.out", "all"), ("2", "layer.out", "all"),
                                                  ("0", "mlp.down_proj.in", "generated")]
    b_norm = float(plan.entries[0].b.norm())
    assert f"{b_norm:.4g}" in out
    assert rows[2][4] == "2"  # two sparse dims
    assert "method" in out

    rc, out, _ = run(capsys, "plan", "show", path, "--json")
    s = json.loads(out)
    assert s["fingerprint"] == spec.fingerprint() and s["format"] == "fusesteer-plan"
    assert [e["layer"] for e in s["entries"]] == [1, 2, 0]
    assert s["entries"][0]["b_norm"] == pytest.approx(b_norm)
    assert s["entries"][2]["a_minus_1_norm"] == pytest.approx(0.5 * 2 ** 0.5)


def test_plan_show_gguf_unbound_and_bound(capsys, tmp_path, spec, tiny_dir):
    src = tmp_path / "p.safetensors"
    _plan(spec).save(src)
    gg = tmp_path / "v.gguf"
    assert run(capsys, "plan", "convert", src, gg)[0] == 0
    rc, out, _ = run(capsys, "plan", "show", gg)
    assert rc == 0 and "GGUF control vector" in out and "unbound" in out and spec.fingerprint() not in out.split(
        "metadata:")[0]
    assert '"model_hint": "llama"' in out
    rc, out, _ = run(capsys, "plan", "show", gg, "--model", tiny_dir)
    assert rc == 0 and f"fingerprint: {spec.fingerprint()}" in out
    rc, out, _ = run(capsys, "plan", "show", gg, "--spec", json.dumps(spec.to_dict()))
    assert rc == 0 and f"fingerprint: {spec.fingerprint()}" in out
    rc, out, _ = run(capsys, "plan", "show", gg, "--spec", src)
    assert rc == 0 and f"fingerprint: {spec.fingerprint()}" in out


def test_plan_show_errors(capsys, tmp_path, spec):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    rc, _, err = run(capsys, "plan", "show", bad)
    assert rc == 2 and "not a readable GGUF file" in err
    rc, _, err = run(capsys, "plan", "show", tmp_path / "x.txt")
    assert rc == 2 and "unknown plan file type" in err
    other = fs.ModelSpec("llama", 3, 32, 48, 32)
    p = tmp_path / "p.safetensors"
    _plan(spec).save(p)
    rc, _, err = run(capsys, "plan", "show", p, "--spec", json.dumps(other.to_dict()))
    assert rc == 2 and "hidden_size is 64 in the plan but 32 in the model" in err


# ------------------------------------------------------------------------------------------------
# plan convert


def test_plan_convert_round_trip(capsys, tmp_path, spec, tiny_dir):
    plan = _plan(spec, seed=4)
    src, gg, back = tmp_path / "a.safetensors", tmp_path / "a.gguf", tmp_path / "b.safetensors"
    plan.save(src)
    rc, out, _ = run(capsys, "plan", "convert", src, gg)
    assert rc == 0 and "wrote" in out and spec.fingerprint() in out
    rc, _, _ = run(capsys, "plan", "convert", gg, back, "--model", tiny_dir)
    assert rc == 0
    again = fs.SteeringPlan.load(back)
    assert again.spec == spec and again.name == "cli-test"
    assert [(e.layer, e.site, e.gating) for e in again.entries] == [(e.layer, e.site, e.gating) for e in plan.entries]
    assert all(torch.equal(x.b, y.b) for x, y in zip(plan.entries, again.entries))

    # unbound import, scale and inclusive layer range
    rc, _, _ = run(capsys, "plan", "convert", gg, tmp_path / "c.safetensors", "--scale", "-0.5",
                   "--layer-range", "2", "2")
    c = fs.SteeringPlan.load(tmp_path / "c.safetensors")
    assert rc == 0 and c.spec is None and [e.layer for e in c.entries] == [2]
    assert torch.equal(c.entries[0].b, plan.entries[1].b * -0.5)

    # gguf -> gguf with a scale equals reading the original with that scale
    rc, _, _ = run(capsys, "plan", "convert", gg, tmp_path / "d.gguf", "--scale", "2")
    d = read_control_vector(tmp_path / "d.gguf")
    assert rc == 0 and all(torch.equal(x.b * 2, y.b) for x, y in zip(plan.entries, d.entries))


def test_plan_convert_refuses_with_the_blocking_entry(capsys, tmp_path, spec):
    plan = _plan(spec)
    plan.add(layer=2, site="layer.out", a=0.5)
    src = tmp_path / "g.safetensors"
    plan.save(src)
    out = tmp_path / "g.gguf"
    rc, _, err = run(capsys, "plan", "convert", src, out)
    assert rc == 2 and "entry 2 (layer=2, site='layer.out'" in err and "a != 1" in err
    assert not out.exists()
    z = _plan(spec, layers=(0,))
    z.save(src)
    rc, _, err = run(capsys, "plan", "convert", src, out)
    assert rc == 2 and "--allow-layer0" in err
    rc, _, _ = run(capsys, "plan", "convert", src, out, "--allow-layer0")
    assert rc == 0 and [e.layer for e in read_control_vector(out).entries] == [0]


# ------------------------------------------------------------------------------------------------
# generate


def _expected(tiny_dir, prompt, plan, n):
    from fusesteer.models import load

    model, tok = load(str(tiny_dir))
    enc = tok(prompt, return_tensors="pt")
    kw = dict(max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        if plan is None:
            ids = model.generate(**enc, **kw)
        else:
            with fs.attach(model, plan, backend="reference"):
                ids = model.generate(**enc, **kw)
    return tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).split()


def test_generate_streams_steered_tokens(capsys, tmp_path, spec, tiny_dir):
    prompt, n = "w5 w17 w33 w40", 8
    plan = _plan(spec, seed=2, scale=6.0)
    gg = tmp_path / "v.gguf"
    from fusesteer.interop.gguf_cv import write_control_vector
    write_control_vector(plan, gg)

    rc, out_plain, _ = run(capsys, "generate", "--model", tiny_dir, "--prompt", prompt, "--max-new-tokens", n)
    assert rc == 0
    plain = _expected(tiny_dir, prompt, None, n)
    assert out_plain.split() == plain and len(plain) == n

    rc, out, err = run(capsys, "generate", "--model", tiny_dir, "--control-vector", f"{gg}:0.5",
                       "--prompt", prompt, "--max-new-tokens", n, "--backend", "torch")
    want = _expected(tiny_dir, prompt, plan.scaled(0.5), n)
    assert rc == 0 and out.split() == want
    assert want != plain, "steering did not change the output: the test would be vacuous"
    assert "2 entries on layers 1..2" in err

    # two vectors sum; --layer-range is inclusive
    rc, out, _ = run(capsys, "generate", "--model", tiny_dir, "--control-vector", f"{gg}:0.5",
                     "--control-vector", f"{gg}:0.5", "--scale", "0.5", "--layer-range", "1", "1",
                     "--prompt", prompt, "--max-new-tokens", n)
    only1 = fs.SteeringPlan(spec).add(layer=1, site="layer.out", b=plan.entries[0].b * 0.5)
    assert rc == 0 and out.split() == _expected(tiny_dir, prompt, only1, n)

    # a fusesteer plan file works the same way
    pf = tmp_path / "p.safetensors"
    plan.save(pf)
    rc, out, _ = run(capsys, "generate", "--model", tiny_dir, "--plan", pf, "--scale", "0.5", "--prompt", prompt,
                     "--max-new-tokens", n)
    assert rc == 0 and out.split() == want


def test_generate_compile_equals_eager(capsys, tmp_path, spec, tiny_dir):
    """--compile: fullgraph torch.compile on a static cache gives the tokens of the eager reference
    (dynamo's eager backend here, to spare CI inductor's code generation; the CLI default is inductor)."""
    prompt, n = "w5 w17 w33 w40", 6
    plan = _plan(spec, seed=2, scale=6.0)
    pf = tmp_path / "p.safetensors"
    plan.save(pf)
    rc, out, _ = run(capsys, "generate", "--model", tiny_dir, "--plan", pf, "--prompt", prompt, "--max-new-tokens",
                     n, "--backend", "torch", "--compile", "--compile-backend", "eager")
    assert rc == 0 and out.split() == _expected(tiny_dir, prompt, plan, n)


def test_generate_errors(capsys, tmp_path, spec, tiny_dir):
    gg = tmp_path / "v.gguf"
    from fusesteer.interop.gguf_cv import write_control_vector
    write_control_vector(_plan(spec), gg)
    with pytest.raises(SystemExit) as exc:  # argparse: mutually exclusive
        main(["generate", "--model", str(tiny_dir), "--plan", str(gg), "--control-vector", str(gg), "--prompt", "x"])
    assert exc.value.code == 2
    capsys.readouterr()
    rc, _, err = run(capsys, "generate", "--model", tiny_dir, "--prompt", "w5", "--chat")
    assert rc == 2 and "no chat template" in err
    other = fs.ModelSpec("llama", 3, 32, 48, 32)
    small = tmp_path / "small.gguf"
    write_control_vector(_plan(other), small)
    rc, _, err = run(capsys, "generate", "--model", tiny_dir, "--control-vector", small, "--prompt", "w5")
    assert rc == 2 and "length 32 but the model's hidden size is 64" in err
    rc, _, err = run(capsys, "generate", "--model", tmp_path / "nope", "--prompt", "w5")
    assert rc == 2 and "nope" in err


def test_control_vector_arg_parsing():
    from fusesteer.commands.generate import control_vector_arg

    assert control_vector_arg("a.gguf") == ("a.gguf", 1.0)
    assert control_vector_arg("a.gguf:-0.5") == ("a.gguf", -0.5)
    assert control_vector_arg("dir:x/a.gguf") == ("dir:x/a.gguf", 1.0)
    assert control_vector_arg("C:/v/a.gguf:2") == ("C:/v/a.gguf", 2.0)


@pytest.mark.slow
def test_generate_smollm2_with_a_gguf_vector(capsys, tmp_path):
    from fusesteer.models import cache_marker

    if cache_marker("smollm2-135m") is None:
        pytest.skip("smollm2-135m is not converted in the fusesteer cache (run `fusesteer demo` once)")
    w = np.random.default_rng(0).standard_normal((3, 576)).astype(np.float32)
    import gguf
    path = tmp_path / "r.gguf"
    wr = gguf.GGUFWriter(str(path), "controlvector")
    wr.add_string("controlvector.model_hint", "llama")
    wr.add_uint32("controlvector.layer_count", 3)
    for i, layer in enumerate((10, 11, 12)):
        wr.add_tensor(f"direction.{layer}", w[i])
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    rc, plain, _ = run(capsys, "generate", "--model", "smollm2-135m", "--prompt", "The capital of France is",
                       "--max-new-tokens", 6)
    rc2, steered, err = run(capsys, "generate", "--model", "smollm2-135m", "--control-vector", f"{path}:6",
                            "--prompt", "The capital of France is", "--max-new-tokens", 6)
    assert rc == rc2 == 0 and plain.strip() and steered.strip() != plain.strip()
    assert "3 entries on layers 10..12" in err
