"""Tests for the task evaluation harness (fusesteer.evaluate.tasks / .stats).

Tiny random Llama models and tokenizers trained on the fly from the bundled data: no downloads.
"""

from __future__ import annotations

import json
import math
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fusesteer.errors import FuseSteerError
from fusesteer.evaluate import stats, tasks
from fusesteer.evaluate.tasks import DatasetError, EvaluationError

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def yn():
    return tasks.load_dataset("strategyqa", limit=24)


@pytest.fixture(scope="module")
def mc():
    return tasks.load_dataset("truthfulqa_mc", limit=16)


def _train_bpe(texts, bos=False):
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    if bos:  # BOS before, EOS after: the harness must keep the first and drop the second
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", tk.token_to_id("<s>")), ("</s>", tk.token_to_id("</s>"))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def corpus(yn, mc):
    return [tasks.format_prompt(r) + "".join(tasks.choice_texts(r)) for r in yn + mc]


@pytest.fixture(scope="module")
def tok(corpus):
    return _train_bpe(corpus)


@pytest.fixture(scope="module")
def tok_bos(corpus):
    return _train_bpe(corpus, bos=True)


def _tiny_llama(vocab, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512,
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model(tok):
    return _tiny_llama(len(tok))


def _write(tmp_path, lines, name="data.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return p


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,n,kind", [("strategyqa", 1200, "yesno"), ("truthfulqa_mc", 150, "mc"),
                                         ("cause_effect", 51, "mc"), ("freshqa", 300, "open")])
def test_bundled_datasets_load(name, n, kind):
    recs = tasks.load_dataset(name)
    assert len(recs) == n
    assert tasks.task_kind(recs) == kind
    assert len({r["id"] for r in recs}) == n
    assert [r["id"] for r in tasks.load_dataset(name, limit=5)] == [r["id"] for r in recs[:5]]
    if kind == "yesno":
        assert {r["answer"] for r in recs} == {"Yes", "No"}


def test_load_path_and_normalisation(tmp_path):
    p = _write(tmp_path, [{"question": "Q1?", "answer": "yes"}, "", {"id": 7, "question": "Q2?", "answer": "NO"}])
    recs = tasks.load_dataset(p)
    assert [r["answer"] for r in recs] == ["Yes", "No"]
    assert [r["id"] for r in recs] == ["data-1", "7"]  # missing id -> "<stem>-<line>"
    assert tasks.load_dataset(str(p), limit=1) == recs[:1]


@pytest.mark.parametrize("lines,line_no,words", [
    ([{"id": "a", "question": "q?", "answer": "Yes"}, {"id": "b", "question": "q?", "answer": "No"},
      {"id": "c", "answer": "Yes"}], 3, ["'question'"]),
    ([{"question": "q?", "answer": "Maybe"}], 1, ["'answer'", "Maybe"]),
    ([{"question": "q?", "choices": ["a", "b"], "answer_index": 2}], 1, ["'answer_index'"]),
    ([{"question": "q?", "choices": ["a", "b"], "answer_index": True}], 1, ["'answer_index'"]),
    ([{"question": "q?", "choices": "a b", "answer_index": 0}], 1, ["'choices'"]),
    ([{"question": "q?", "choices": ["a", ""], "answer_index": 0}], 1, ["'choices'[1]"]),
    ([{"question": "q?", "choices": ["a", "b"]}], 1, ["'answer_index'"]),
    ([{"question": "q?", "answers": []}], 1, ["'answers'"]),
    ([{"question": "q?"}], 1, ["no answer field"]),
    ([{"question": "  ", "answer": "Yes"}], 1, ["'question'"]),
    ([{"question": "q?", "answer": "Yes"}, '{"question": "q?", "answer": '], 2, ["invalid JSON"]),
    (["[1, 2]"], 1, ["JSON object"]),
    ([{"question": "q?", "answer": "Yes"}, {"question": "r?", "choices": ["a", "b"], "answer_index": 0}],
     2, ["'mc'", "line 1", "'yesno'"]),
    ([{"id": "x", "question": "q?", "answer": "Yes"}, {"id": "x", "question": "r?", "answer": "No"}],
     2, ["'id'", "duplicates line 1"]),
])
def test_load_errors_name_file_line_field(tmp_path, lines, line_no, words):
    p = _write(tmp_path, lines, name="bad_set.jsonl")
    with pytest.raises(DatasetError) as ei:
        tasks.load_dataset(p)
    msg = str(ei.value)
    assert "bad_set.jsonl" in msg and f"line {line_no}:" in msg, msg
    for w in words:
        assert w in msg, msg
    assert isinstance(ei.value, FuseSteerError) and isinstance(ei.value, ValueError)


def test_load_bad_arguments(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'nope'.*strategyqa"):
        tasks.load_dataset("nope")
    with pytest.raises(DatasetError, match="limit"):
        tasks.load_dataset("strategyqa", limit=-1)
    with pytest.raises(DatasetError, match="no records"):
        tasks.load_dataset(_write(tmp_path, ["", ""]))
    with pytest.raises(DatasetError, match="mix"):
        tasks.task_kind([{"question": "q", "answer": "Yes"}, {"question": "q", "answers": ["x"]}])
    with pytest.raises(DatasetError):
        tasks.task_kind([])


def test_split_deterministic_disjoint():
    recs = tasks.load_dataset("strategyqa", limit=100)
    val, test = tasks.split(recs, 30, 50, seed=3)
    assert len(val) == 30 and len(test) == 50
    ids_v, ids_t = {r["id"] for r in val}, {r["id"] for r in test}
    assert not ids_v & ids_t
    val2, test2 = tasks.split(recs, 30, 50, seed=3)
    assert val2 == val and test2 == test
    val3, _ = tasks.split(recs, 30, 50, seed=4)
    assert [r["id"] for r in val3] != [r["id"] for r in val]
    v, rest = tasks.split(recs, 10, None)
    assert len(rest) == 90 and not {r["id"] for r in v} & {r["id"] for r in rest}
    with pytest.raises(DatasetError, match="exceeds"):
        tasks.split(recs, 60, 50)
    with pytest.raises(DatasetError, match="n_val"):
        tasks.split(recs, -1, 5)


# --------------------------------------------------------------------------------------------
# Prompts and tokenization
# --------------------------------------------------------------------------------------------
def test_prompt_builders():
    y = {"question": " Is water wet? ", "answer": "No"}
    assert tasks.format_prompt(y) == "Question: Is water wet?\nAnswer (Yes or No):"
    assert tasks.choice_texts(y) == [" Yes", " No"]
    assert tasks.gold_index(y) == 1
    m = {"question": "Pick", "choices": ["A thing.", "B thing."], "answer_index": 1}
    assert tasks.format_prompt(m, "mc") == "Question: Pick\nAnswer:"
    assert tasks.choice_texts(m) == [" A thing.", " B thing."]
    assert tasks.choice_texts(m, chat_template=True) == ["A thing.", "B thing."]
    assert tasks.gold_index(m) == 1
    o = {"question": "Who?", "answers": ["Me"]}
    assert tasks.format_prompt(o) == "Question: Who?\nAnswer:"
    with pytest.raises(DatasetError):
        tasks.choice_texts(o)


def test_chat_template(tok, model, yn):
    with pytest.raises(EvaluationError, match="chat template"):
        tasks.format_prompt(yn[0], chat_template=True, tokenizer=tok)
    tok2 = _train_bpe([tasks.format_prompt(r) for r in yn])
    tok2.chat_template = ("{% for m in messages %}<s>User: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}Assistant:{% endif %}")
    p = tasks.format_prompt(yn[0], chat_template=True, tokenizer=tok2)
    assert p == "<s>User: " + tasks.format_prompt(yn[0]) + "\nAssistant:"
    res = tasks.evaluate(_tiny_llama(len(tok2)), tok2, yn[:4], chat_template=True, progress=False)
    assert res.n == 4


def test_encode_continuation_boundaries(tok, tok_bos):
    prompt = "Question: Is it?\nAnswer (Yes or No):"
    p, c = tasks.encode_continuation(tok, prompt, " Yes")
    assert p == tok(prompt)["input_ids"]
    assert p + c == tok(prompt + " Yes")["input_ids"]
    # BOS kept in front, EOS appended by the tokenizer dropped
    pb, cb = tasks.encode_continuation(tok_bos, prompt, " Yes")
    bos, eos = tok_bos.convert_tokens_to_ids(["<s>", "</s>"])
    assert pb[0] == bos and eos not in pb + cb
    assert pb[1:] == tok_bos(prompt, add_special_tokens=False)["input_ids"] and cb == c
    pn, _ = tasks.encode_continuation(tok_bos, prompt, " Yes", add_special_tokens=False)
    assert pn == pb[1:]

    # a word-level tokenizer that merges across the boundary: "ab" + "c" -> "abc"
    vocab = {"[UNK]": 0, "x": 1, "ab": 2, "abc": 3, "c": 4}
    wl = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wtok = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="[UNK]")
    assert wtok("x abc", add_special_tokens=False)["input_ids"] == [1, 3]
    assert tasks.encode_continuation(wtok, "x ab", "c") == ([1, 2], [4])  # merged: tokenized apart
    assert tasks.encode_continuation(wtok, "x ab", " c") == ([1, 2], [4])  # no merge: in context
    with pytest.raises(EvaluationError, match="no tokens"):
        tasks.encode_continuation(wtok, "x ab", " ")


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
def _hand_score(model, ids_p, ids_c):
    ids = torch.tensor([ids_p + ids_c])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return sum(float(lp[len(ids_p) - 1 + j, t]) for j, t in enumerate(ids_c))


@pytest.mark.parametrize("which", ["tok", "tok_bos"])
def test_sum_logprob_matches_hand_computation(request, which, model, mc):
    tk = request.getfixturevalue(which)
    r = mc[1]
    prompt, choices = tasks.format_prompt(r), tasks.choice_texts(r)
    scores, toks = tasks.score_choices(model, tk, [prompt], [choices], return_tokens=True)
    for j, c in enumerate(choices):
        p_ids, c_ids = tasks.encode_continuation(tk, prompt, c)
        assert len(toks[0][j]) == len(c_ids) > 1
        assert scores[0][j] == pytest.approx(_hand_score(model, p_ids, c_ids), abs=1e-4)
    mean = tasks.score_choices(model, tk, [prompt], [choices], normalize="mean")
    for j in range(len(choices)):
        assert mean[0][j] == pytest.approx(scores[0][j] / len(toks[0][j]), rel=1e-12)


def test_batched_equals_unbatched(model, tok, mc, yn):
    recs = mc[:6]
    prompts = [tasks.format_prompt(r) for r in recs]
    choices = [tasks.choice_texts(r) for r in recs]
    lens = {len(sum(tasks.encode_continuation(tok, p, c), [])) for p, cs in zip(prompts, choices) for c in cs}
    assert len(lens) > 3  # real padding happens
    ref = tasks.score_choices(model, tok, prompts, choices, batch_size=1)
    for bs in (3, 8, 64):
        got = tasks.score_choices(model, tok, prompts, choices, batch_size=bs)
        assert [len(x) for x in got] == [len(x) for x in ref]
        np.testing.assert_allclose(np.concatenate(got), np.concatenate(ref), atol=1e-5, rtol=0)
    yp = [tasks.format_prompt(r) for r in yn[:7]]
    a = tasks.yesno_logits(model, tok, yp, batch_size=1)
    b = tasks.yesno_logits(model, tok, yp, batch_size=4)
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5, rtol=0)


def test_logits_method_equals_logprob_for_single_token_choices(model, tok, yn):
    prompts = [tasks.format_prompt(r) for r in yn[:8]]
    for p in prompts[:2]:
        assert len(tasks.encode_continuation(tok, p, " Yes")[1]) == 1
        assert len(tasks.encode_continuation(tok, p, " No")[1]) == 1
    a = tasks.yesno_logits(model, tok, prompts)
    b = tasks.score_choices(model, tok, prompts, [[" Yes", " No"]] * len(prompts))
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5, rtol=0)
    r1 = tasks.evaluate(model, tok, yn, method="logits", progress=False)
    r2 = tasks.evaluate(model, tok, yn, method="logprob", progress=False)
    assert [i.pred for i in r1.items] == [i.pred for i in r2.items]


def test_evaluate_picks_argmax_and_reports(model, tok, mc):
    res = tasks.evaluate(model, tok, mc, batch_size=4, progress=False, name="tqa")
    assert res.kind == "mc" and res.n == len(mc)
    direct = tasks.score_choices(model, tok, [tasks.format_prompt(r) for r in mc],
                                 [tasks.choice_texts(r) for r in mc])
    for it, r, sc in zip(res.items, mc, direct):
        assert it.id == r["id"] and it.gold == r["answer_index"]
        np.testing.assert_allclose(it.scores, sc, atol=1e-5)
        assert it.pred == int(np.argmax(sc)) and it.correct == (it.pred == it.gold)
    assert res.correct == sum(res.correct_vector)
    assert res.accuracy == res.correct / res.n
    assert (res.ci_low, res.ci_high) == stats.wilson_ci(res.correct, res.n)
    assert res.elapsed_s > 0
    d = json.loads(json.dumps(res.to_dict()))
    assert d["n"] == res.n and len(d["items"]) == res.n and "items" not in res.to_dict(items=False)
    t = res.table()
    assert t.count("\n") == 2 and "| tqa |" in t and f"{res.accuracy:.3f}" in t


class _Oracle(torch.nn.Module):
    """A 'model' whose next-token logits put +20 on the tokens of a planted continuation of each prompt."""

    def __init__(self, tokenizer, records, vocab, wrong=False):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.vocab = vocab
        self.plants = []
        for r in records:
            p, cs = tasks.format_prompt(r), tasks.choice_texts(r)
            g = tasks.gold_index(r)
            target = (g + 1) % len(cs) if wrong else g
            pids, cids = tasks.encode_continuation(tokenizer, p, cs[target])
            self.plants.append((pids, cids))
        self.calls = 0

    def forward(self, input_ids, attention_mask):
        self.calls += 1
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            row = input_ids[b, : int(attention_mask[b].sum())].tolist()
            best = max((pl for pl in self.plants if row[: len(pl[0])] == pl[0]), key=lambda pl: len(pl[0]))
            pids, cids = best
            for j, t in enumerate(cids):
                if len(pids) - 1 + j < T:
                    logits[b, len(pids) - 1 + j, t] = 20.0
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("dataset", ["yn", "mc"])
def test_planted_model_scores_100_and_0(request, dataset, tok):
    recs = request.getfixturevalue(dataset)
    good = tasks.evaluate(_Oracle(tok, recs, len(tok)), tok, recs, batch_size=5, progress=False)
    assert good.accuracy == 1.0 and good.correct == len(recs)
    bad = tasks.evaluate(_Oracle(tok, recs, len(tok), wrong=True), tok, recs, batch_size=5, progress=False)
    assert bad.accuracy == 0.0
    if dataset == "yn":
        assert tasks.evaluate(_Oracle(tok, recs, len(tok)), tok, recs, method="logits", progress=False).accuracy == 1.0


def test_ties_and_nans_count_as_wrong(monkeypatch, model, tok, mc):
    # the bundled mc files put the answer at index 0: constant scores must not win by picking index 0
    monkeypatch.setattr(tasks, "score_choices", lambda m, t, p, ch, *a, **k: [[0.0] * len(c) for c in ch])
    res = tasks.evaluate(model, tok, mc, progress=False)
    assert res.accuracy == 0.0 and all(it.tie and it.pred == -1 for it in res.items)
    monkeypatch.setattr(tasks, "score_choices", lambda m, t, p, ch, *a, **k: [[math.nan] * len(c) for c in ch])
    assert tasks.evaluate(model, tok, mc, progress=False).accuracy == 0.0
    monkeypatch.setattr(tasks, "score_choices",
                        lambda m, t, p, ch, *a, **k: [[-1.0 - j for j in range(len(c))] for c in ch])
    assert tasks.evaluate(model, tok, mc, progress=False).accuracy == 1.0


def test_evaluate_argument_errors(model, tok, yn, mc):
    with pytest.raises(EvaluationError, match="yes/no"):
        tasks.evaluate(model, tok, mc, method="logits", progress=False)
    with pytest.raises(EvaluationError, match="open"):
        tasks.evaluate(model, tok, tasks.load_dataset("freshqa", limit=2), progress=False)
    with pytest.raises(EvaluationError, match="method"):
        tasks.evaluate(model, tok, yn, method="greedy", progress=False)
    with pytest.raises(EvaluationError, match="non-empty"):
        tasks.evaluate(model, tok, [], progress=False)
    with pytest.raises(EvaluationError, match="batch_size"):
        tasks.evaluate(model, tok, yn, batch_size=0, progress=False)
    with pytest.raises(EvaluationError, match="normalize"):
        tasks.score_choices(model, tok, ["a"], [["b"]], normalize="max")
    with pytest.raises(EvaluationError, match="one list of continuations per prompt"):
        tasks.score_choices(model, tok, ["a", "b"], [[" c"]])
    with pytest.raises(DatasetError, match="record 1.*'answer'"):
        tasks.evaluate(model, tok, [yn[0], {"question": "q?", "answer": "Perhaps"}], kind="yesno", progress=False)
    small = _tiny_llama(200)
    with pytest.raises(EvaluationError, match="vocabulary"):
        tasks.evaluate(small, tok, yn[:2], progress=False)


def test_training_mode_restored_and_dropout_off(tok, yn):
    m = _tiny_llama(len(tok))
    m.config.attention_dropout = 0.5
    prompts = [tasks.format_prompt(r) for r in yn[:3]]
    ref = tasks.score_choices(m, tok, prompts, [[" Yes", " No"]] * 3)
    m.train()
    got = tasks.score_choices(m, tok, prompts, [[" Yes", " No"]] * 3)
    assert m.training
    np.testing.assert_allclose(np.array(got), np.array(ref), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------
def test_wilson_known_values():
    lo, hi = stats.wilson_ci(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert stats.wilson_ci(0, 10) == (0.0, pytest.approx(1.96**2 / (10 + 1.96**2)))  # 0.2775
    lo, hi = stats.wilson_ci(10, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / (10 + 1.96**2))
    lo, hi = stats.wilson_ci(81, 263)  # roots of (p - x)^2 = z^2 x (1 - x) / n: 0.25529, 0.36621
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)
    a, b = stats.wilson_ci(3, 17)
    c, d = stats.wilson_ci(14, 17)
    assert a == pytest.approx(1 - d) and b == pytest.approx(1 - c)
    assert stats.wilson_ci(50, 100, z=2.576)[0] < stats.wilson_ci(50, 100)[0]
    for bad in [(5, 0), (11, 10), (-1, 10), (1.5, 10)]:
        with pytest.raises(stats.StatsError):
            stats.wilson_ci(*bad)


def test_bootstrap_ci():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 1.0, size=200)
    ci = stats.bootstrap_ci(x)
    assert ci.estimate == pytest.approx(float(np.median(x)))
    assert ci.low < ci.estimate < ci.high and ci.high - ci.low < 0.6
    assert stats.bootstrap_ci(x) == ci  # deterministic
    assert stats.bootstrap_ci(x, seed=5) != ci
    # a generic callable gets the same resamples as the vectorised path
    assert stats.bootstrap_ci(x, stat=lambda v: float(np.mean(v)), n_boot=300) == \
        pytest.approx(tuple(stats.bootstrap_ci(x, stat="mean", n_boot=300)))
    assert stats.bootstrap_ci(x, stat=statistics.median, n_boot=300) == \
        pytest.approx(tuple(stats.bootstrap_ci(x, n_boot=300)))
    assert tuple(stats.bootstrap_ci([2.0] * 9)) == (2.0, 2.0, 2.0)
    wide = stats.bootstrap_ci(x, alpha=0.01)
    assert wide.low <= ci.low and wide.high >= ci.high
    for bad in [dict(values=[]), dict(values=[1.0, math.nan]), dict(values=x, n_boot=0), dict(values=x, alpha=1.5)]:
        with pytest.raises(stats.StatsError):
            stats.bootstrap_ci(**bad)


def test_paired_bootstrap_and_mcnemar():
    a = [True] * 5 + [False] * 5
    assert tuple(stats.paired_bootstrap_diff(a, a)) == (0.0, 0.0, 0.0)
    assert tuple(stats.paired_bootstrap_diff([1] * 8, [0] * 8)) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(0)
    b = rng.random(300) < 0.7
    c = b.copy()
    c[:40] = ~c[:40]
    ci = stats.paired_bootstrap_diff(b, c)
    assert ci.estimate == pytest.approx(b.mean() - c.mean())
    assert ci.low <= ci.estimate <= ci.high
    neg = stats.paired_bootstrap_diff(c, b)
    assert neg.estimate == pytest.approx(-ci.estimate)

    # 1 item only a right, 5 only b right: p = 2 * (C(6,0) + C(6,1)) / 2^6
    x = [1, 0, 0, 0, 0, 0, 1, 1]
    y = [0, 1, 1, 1, 1, 1, 1, 1]
    assert stats.mcnemar_p(x, y) == pytest.approx(2 * 7 / 64)
    assert stats.mcnemar_p(y, x) == stats.mcnemar_p(x, y)
    assert stats.mcnemar_p(a, a) == 1.0
    assert stats.mcnemar_p([1, 0], [0, 1]) == 1.0
    assert stats.mcnemar_p([1] * 3000, [0] * 3000) < 1e-300  # big n: exact integers, no overflow
    assert stats.mcnemar_p([1] * 20 + [0] * 5, [0] * 20 + [1] * 5) == pytest.approx(
        2 * sum(math.comb(25, i) for i in range(6)) / 2**25)
    with pytest.raises(stats.StatsError, match="same items"):
        stats.mcnemar_p([1, 0], [1])
    with pytest.raises(stats.StatsError, match="0-1"):
        stats.paired_bootstrap_diff([0.5, 1], [1, 1])


def test_scipy_backed_statistics_equal_their_closed_forms():
    """wilson_ci and mcnemar_p go through scipy.stats.binomtest: they give the closed-form numbers."""
    import math

    from fusesteer.evaluate.stats import mcnemar_p, wilson_ci

    def wilson(k, n, z=1.96):
        p, z2 = k / n, z * z
        d = 1 + z2 / n
        c, h = (p + z2 / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / d
        return (0.0 if k == 0 else max(0.0, c - h)), (1.0 if k == n else min(1.0, c + h))

    for n in range(1, 200, 7):
        for k in range(0, n + 1, 3):
            for z in (1.0, 1.96, 2.576):
                assert wilson_ci(k, n, z) == pytest.approx(wilson(k, n, z), abs=1e-12)
    for only_a in range(0, 40, 3):
        for only_b in range(0, 40, 4):
            n = only_a + only_b
            tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
            want = 1.0 if n == 0 else min(1.0, 2 * tail / 2 ** n)
            a = [1] * only_a + [0] * only_b + [1, 0]
            b = [0] * only_a + [1] * only_b + [1, 0]
            assert mcnemar_p(a, b) == pytest.approx(want, abs=1e-12)
