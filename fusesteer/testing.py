"""Test fixtures that the test suite, the benchmarks and users' own tests share: tiny random-weight models of
every supported family, and the parity tolerances a backend must meet against the ``reference`` hooks.

The tolerances live in :mod:`fusesteer.tolerances` (every parity tolerance of the project, with where each
number comes from); the logit ones are re-exported here.
"""

from __future__ import annotations

import torch

from fusesteer.errors import ModelLoadError
from fusesteer.tolerances import (  # noqa: F401 - the parity tolerances, re-exported for users' own tests
    EXACT_TOKEN_DTYPES,
    FP32_ABS,
    HALF_ABS,
    HALF_ABS_TRITON,
    HALF_REL,
    HALF_REL_TRITON,
    INT8_ABS,
    MIN_EFFECT,
    describe,
    logit_tolerance,
    tokens_must_agree,
)


# --------------------------------------------------------------------------------------------------
# tiny random models
# --------------------------------------------------------------------------------------------------
def _resolve_dtype(dtype):
    from fusesteer.models import _resolve_dtype as resolve

    return resolve(dtype)



TINY_FAMILIES = ("llama", "gemma2", "gemma3", "qwen2", "qwen3", "mistral", "gemma", "granite", "phi3", "olmo2",
                 "qwen3_moe")
#: a decoder transformers ships that fusesteer has no adapter for (the generic reference-hooks path)
TINY_GENERIC = ("cohere",)
_TINY_CLASSES = {"llama": "LlamaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
                 "gemma": "GemmaForCausalLM", "granite": "GraniteForCausalLM", "phi3": "Phi3ForCausalLM",
                 "olmo2": "Olmo2ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "cohere": "CohereForCausalLM"}

_TINY_COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    rms_norm_eps=1e-6,
)


def _tiny_config(family: str, overrides: dict):
    import transformers as tf

    kw = dict(_TINY_COMMON)
    if family == "llama":
        cls, kw_f = tf.LlamaConfig, dict(num_hidden_layers=3)
    elif family == "qwen2":
        cls, kw_f = tf.Qwen2Config, dict(num_hidden_layers=3)  # q/k/v carry biases
    elif family == "qwen3":
        cls, kw_f = tf.Qwen3Config, dict(num_hidden_layers=3)  # per-head q/k RMSNorm
    elif family == "gemma2":
        cls, kw_f = tf.Gemma2Config, dict(
            num_hidden_layers=3, sliding_window=8, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    elif family == "gemma3":
        cls, kw_f = tf.Gemma3TextConfig, dict(
            num_hidden_layers=4, sliding_window=8, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])
    elif family == "mistral":
        cls, kw_f = tf.MistralConfig, dict(num_hidden_layers=3, sliding_window=8)
    elif family == "gemma":
        cls, kw_f = tf.GemmaConfig, dict(num_hidden_layers=3)  # (1 + w) norms, gelu-tanh GLU, no sandwich norms
    elif family == "granite":  # every multiplier away from 1
        cls, kw_f = tf.GraniteConfig, dict(num_hidden_layers=3, residual_multiplier=0.5, embedding_multiplier=2.0,
                                           attention_multiplier=0.0625, logits_scaling=2.0)
    elif family == "phi3":  # fused qkv_proj / gate_up_proj
        cls, kw_f = tf.Phi3Config, dict(num_hidden_layers=3)
    elif family == "olmo2":  # norms after attention / MLP
        cls, kw_f = tf.Olmo2Config, dict(num_hidden_layers=3)
    elif family == "qwen3_moe":  # layers 0 and 2 sparse (4 experts, top 2), layer 1 dense
        cls, kw_f = tf.Qwen3MoeConfig, dict(num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                                            moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[1],
                                            norm_topk_prob=True)
    elif family == "cohere":  # no adapter: parallel attention + MLP block, LayerNorm
        cls, kw_f = tf.CohereConfig, dict(num_hidden_layers=3, tie_word_embeddings=False)
    else:
        raise ModelLoadError(f"unknown tiny family {family!r}; expected one of "
                             f"{', '.join(TINY_FAMILIES + TINY_GENERIC)}")
    kw.update(kw_f)
    if "num_hidden_layers" in overrides and "layer_types" in kw and "layer_types" not in overrides:
        n = overrides["num_hidden_layers"]
        pattern = kw["layer_types"]
        kw["layer_types"] = [pattern[i % len(pattern)] for i in range(n)] if isinstance(n, int) else pattern
    defaults = cls()
    unknown = [k for k in overrides if not hasattr(defaults, k) and k not in kw]
    if unknown:
        raise ModelLoadError(f"tiny({family!r}): unknown config field(s) {', '.join(map(repr, unknown))}")
    kw.update(overrides)
    try:
        config = cls(**kw)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"tiny({family!r}): invalid config: {e}") from None
    config._attn_implementation = "eager"
    return config


def _init_tiny_weights(model, seed: int) -> None:
    """Deterministic, non-degenerate weights from a private generator (global RNG untouched).

    Linear weights ~ N(0, 1/fan_in) keep activations O(1) through the stack; embeddings ~ N(0, 1)
    (Gemma: N(0, 1/hidden), as Gemma scales them by sqrt(hidden) and ties them to the head);
    biases ~ N(0, 0.1^2); RMSNorm weights ~ 1 + N(0, 0.1^2) -- for Gemma, whose norms compute x·(1 + w),
    w ~ N(0, 0.1^2), so the (1 + w) factor is not trivially 1 either.
    """
    g = torch.Generator().manual_seed(int(seed))
    gemma = model.config.model_type.startswith("gemma")
    with torch.no_grad():
        seen = set()
        for pname, p in model.named_parameters():  # tied parameters are yielded once
            if id(p) in seen:
                continue
            seen.add(id(p))
            leaf = pname.rsplit(".", 1)[0]
            if "norm" in leaf.rsplit(".", 1)[-1]:
                val = 0.1 * torch.randn(p.shape, generator=g)
                if not gemma:
                    val += 1.0
            elif pname.endswith("bias"):
                val = 0.1 * torch.randn(p.shape, generator=g)
            elif "embed_tokens" in pname:
                # Gemma multiplies embeddings by sqrt(hidden) and ties them to the LM head.
                val = torch.randn(p.shape, generator=g) * (p.shape[1] ** -0.5 if gemma else 1.0)
            elif p.dim() >= 2:  # linears and stacked expert weights [E, out, in]: N(0, 1/fan_in)
                val = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
            else:
                val = 0.1 * torch.randn(p.shape, generator=g)
            p.copy_(val.to(p.dtype))


def tiny(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny random-weight causal LM of ``family`` (one of :data:`TINY_FAMILIES`), in eval mode.

    Shape: hidden 64, intermediate 96, 4 query heads / 2 kv heads of head_dim 16, vocab 128, 3 layers
    (Gemma-3: 4 layers, sliding/sliding/full/sliding, window 8; Gemma-2: sliding/full/sliding, window 8;
    Mistral: window 8; Granite: multipliers 0.5 / 2 / 1/16 / 2; Qwen3-MoE: sparse/dense/sparse, 4 experts, top 2),
    eager attention. ``overrides`` are config fields (e.g. ``num_hidden_layers=2``,
    ``tie_word_embeddings=False``). The same (family, seed, overrides) always gives the same weights; the
    global torch RNG is not consumed. ``generation_config.eos_token_id`` is None, so ``generate()`` always
    produces exactly ``max_new_tokens`` tokens; pad id is 0.
    """
    import transformers as tf

    dtype = _resolve_dtype(dtype)
    config = _tiny_config(family, overrides)
    with torch.random.fork_rng(devices=[]):
        model = getattr(tf, _TINY_CLASSES[family])(config)
    _init_tiny_weights(model, seed)
    model.to(dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    model.eval()
    return model


def word_tokenizer(texts, size: int = 128):
    """A whitespace word-level tokenizer over ``texts`` (the ``size - 4`` most frequent words, then <unk>), for
    tiny models whose vocabulary is ``size``: real tokenization paths without a downloaded tokenizer."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    words: dict[str, int] = {}
    for t in texts:
        for w in t.split():
            words[w] = words.get(w, 0) + 1
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= size:
            break
        vocab[w] = len(vocab)
    tk = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
