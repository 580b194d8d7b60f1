"""Fusion Steering: references, segments, plans, prefill reuse, studies (resume, two workers), grading, CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from fusesteer.evaluate import grading as G
from fusesteer.methods import fusion as F
from fusesteer.methods.fusion.files import safe_id
from fusesteer.runtime.attach import attach
from fusesteer.runtime.plan import ModelSpec

WORDS = ("Question Answer and Explanation : ? . , Who What is was the capital of France Paris it city "
         "a river in Rome Italy Yes No largest planet Jupiter because").split()


def word_tokenizer(bos=True):
    """A WordLevel tokenizer over WORDS (one token per word or punctuation mark), ids < 128."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers import models as tm
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    for i in range(len(vocab), 128):
        vocab[f"w{i}"] = i
    t = Tokenizer(tm.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        t.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>"), vocab


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on a shared, oversubscribed CPU OpenMP spinning makes 2 threads far slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tok_vocab():
    return word_tokenizer()


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models("llama")


def _ids(vocab, text_words):
    return [vocab[w] for w in text_words]


# --------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------
def _hand_layer_means(model, ids, start, end):
    """[L, H] mean of every decoder layer's output over [start, end), via hooks on the layers (by hand)."""
    outs = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, l=l: outs.__setitem__(l, o[0] if isinstance(o, tuple) else o))
             for l, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    finally:
        for h in hooks:
            h.remove()
    L = len(model.model.layers)
    # layers 0..L-2 also equal hidden_states[l+1] (the last one is taken after the final norm)
    for l in range(L - 1):
        torch.testing.assert_close(outs[l], hs[l + 1], rtol=0, atol=0)
    return torch.stack([outs[l][0, start:end].float().mean(0) for l in range(L)])


def test_reference_h_mu_delta_match_hand_computation(llama, tok_vocab):
    tok, vocab = tok_vocab
    q, truth, expl = "What is the capital of France?", "Paris", "Paris is the capital city of France."
    ref = F.compute_reference(llama, tok, q, truth, expl)
    # enriched: <bos> Question : What is the capital of France ? Answer and Explanation : | Paris Paris is ...
    prefix = ["<bos>", "Question", ":", "What", "is", "the", "capital", "of", "France", "?", "Answer", "and",
              "Explanation", ":"]
    target = ["Paris", "Paris", "is", "the", "capital", "city", "of", "France", "."]
    h = _hand_layer_means(llama, _ids(vocab, prefix + target), len(prefix), len(prefix) + len(target))
    # question-only prompt without the BOS position
    qp = ["<bos>", "Question", ":", "What", "is", "the", "capital", "of", "France", "?", "Answer", ":"]
    mu = _hand_layer_means(llama, _ids(vocab, qp), 1, len(qp))
    assert ref.span == (len(prefix), len(prefix) + len(target)) and ref.mu_span == (1, len(qp))
    torch.testing.assert_close(ref.h, h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.mu, mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.delta, h - mu, rtol=1e-5, atol=1e-5)
    assert ref.variant == "explanation" and ref.h.shape == (3, 64)

    # answer-only variant: the span is just "Paris"
    ao = F.compute_reference(llama, tok, q, truth, None)
    h1 = _hand_layer_means(llama, _ids(vocab, prefix + ["Paris"]), len(prefix), len(prefix) + 1)
    torch.testing.assert_close(ao.h, h1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ao.mu, mu, rtol=1e-5, atol=1e-5)
    assert ao.variant == "answer" and not torch.allclose(ao.h, ref.h)

    # with the BOS included, mu changes (so the exclusion is real)
    inc = F.compute_reference(llama, tok, q, truth, None, exclude_special=False)
    assert inc.mu_span == (0, len(qp)) and not torch.allclose(inc.mu, mu)


def test_reference_save_load_roundtrip(llama, tok_vocab, tmp_path):
    tok, _ = tok_vocab
    ref = F.compute_reference(llama, tok, "Who is it?", "Paris", "it is a city", explanation_source="generated")
    ref.save(tmp_path / "r.safetensors")
    back = F.Reference.load(tmp_path / "r.safetensors")
    assert torch.equal(back.h, ref.h) and torch.equal(back.mu, ref.mu)
    assert (back.question, back.truth, back.explanation, back.explanation_source, back.span) == \
        (ref.question, ref.truth, ref.explanation, "generated", ref.span)
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(F.FusionError, match="cannot read reference"):
        F.Reference.load(tmp_path / "bad.safetensors")


def test_token_span_boundary_merge_and_trailing_special():
    from tokenizers import Tokenizer, processors
    from tokenizers import models as tm
    from transformers import PreTrainedTokenizerFast

    vocab = {"x": 0, "a": 1, "b": 2, "ab": 3, "<eos>": 4}
    t = Tokenizer(tm.BPE(vocab=vocab, merges=[("a", "b")]))
    t.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 4)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>")
    assert tok("xa").input_ids == [0, 1, 4] and tok("xab").input_ids == [0, 3, 4]
    ids, s, e = F.token_span(tok, "xa", "xab")  # "a" + "b" merge across the boundary
    assert ids == [0, 3, 4] and (s, e) == (1, 2)
    ids, s, e = F.token_span(tok, "x", "xab")
    assert (s, e) == (1, 2)
    ids, s, e = F.token_span(tok, "x", "xbab")
    assert ids[s:e] == [2, 3]
    with pytest.raises(F.FusionError):
        F.token_span(tok, "xa", "yab")


# --------------------------------------------------------------------------------------------
# segments and plans
# --------------------------------------------------------------------------------------------
def test_segment_bounds():
    assert F.segment_bounds(18) == [(0, 6), (6, 12), (12, 18)]
    assert F.segment_bounds(26) == [(0, 9), (9, 18), (18, 26)]
    assert F.segment_bounds(30) == [(0, 10), (10, 20), (20, 30)]
    assert F.segment_bounds(28) == [(0, 10), (10, 19), (19, 28)]
    assert F.segment_bounds(3) == [(0, 1), (1, 2), (2, 3)]
    for L in range(3, 64):
        b = F.segment_bounds(L)
        sizes = [e - s for s, e in b]
        assert b[0][0] == 0 and b[-1][1] == L and all(b[i][1] == b[i + 1][0] for i in range(2))
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(F.FusionError, match="at least 3 layers"):
        F.segment_bounds(2)


def _fake_ref(L, H, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.Reference(h=torch.randn(L, H, generator=g), mu=torch.randn(L, H, generator=g), question="q?",
                       truth="t", explanation="e")


SEG = {"alpha_early": 0.2, "gamma_early": 0.5, "alpha_middle": 0.9, "gamma_middle": 0.1,
       "alpha_late": 0.4, "gamma_late": 0.75}


@pytest.mark.parametrize("L", [18, 26, 30])
@pytest.mark.parametrize("blend", ["paper", "interp"])
def test_plan_equals_formula(L, blend):
    H = 8
    spec = ModelSpec("llama", L, H, 16, 8)
    ref = _fake_ref(L, H)
    delta = ref.h - ref.mu
    bounds = F.segment_bounds(L)
    for mode, params in (("full", {"alpha": 0.3, "gamma": 0.6}), ("segmented", SEG)):
        plan = F.fusion_plan(ref, spec, params, mode=mode, blend=blend)
        assert [e.layer for e in plan.entries] == list(range(L))
        assert all(e.site == "layer.out" and e.gating == "all" for e in plan.entries)
        x = torch.randn(H)
        maps = plan.phase_maps()
        for l, e in enumerate(plan.entries):
            if mode == "full":
                al, ga = 0.3, 0.6
            else:
                seg = next(i for i, (s, t) in enumerate(bounds) if s <= l < t)
                name = F.SEGMENTS[seg]
                al, ga = params[f"alpha_{name}"], params[f"gamma_{name}"]
            a, b = maps[(l, "layer.out")]["generated"]
            if blend == "paper":
                assert e.a is None
                torch.testing.assert_close(e.b, al * ga * delta[l])
                want = (1 - al) * x + al * (x + ga * delta[l])  # paper's fused activation
            else:
                torch.testing.assert_close(e.a, torch.tensor(1 - al))
                torch.testing.assert_close(e.b, (1 - al) * ga * delta[l] + al * ref.h[l])
                want = (1 - al) * (x + ga * delta[l]) + al * ref.h[l]
            torch.testing.assert_close(a * x + b, want, rtol=1e-5, atol=1e-5)
        assert plan.metadata["mode"] == mode and plan.metadata["blend"] == blend


def test_plan_errors():
    spec = ModelSpec("llama", 4, 8, 16, 8)
    ref = _fake_ref(4, 8)
    with pytest.raises(F.FusionError, match="shape"):
        F.fusion_plan(_fake_ref(5, 8), spec, {"alpha": 0.1, "gamma": 0.1})
    with pytest.raises(F.FusionError, match="alpha must lie"):
        F.fusion_plan(ref, spec, {"alpha": 1.5, "gamma": 0.1})
    with pytest.raises(F.FusionError, match="missing parameter"):
        F.fusion_plan(ref, spec, {"alpha": 0.5})
    with pytest.raises(F.FusionError, match="unknown parameter"):
        F.fusion_plan(ref, spec, {"alpha": 0.5, "gamma": 0.1, "beta": 1})
    with pytest.raises(F.FusionError, match="unknown mode"):
        F.fusion_plan(ref, spec, {"alpha": 0.5, "gamma": 0.1}, mode="thirds")
    with pytest.raises(F.FusionError, match="gating"):
        F.fusion_plan(ref, spec, {"alpha": 0.5, "gamma": 0.1}, gating="prompt")
    avg = F.average_params([{"alpha": 0.2, "gamma": 0.4}, {"alpha": 0.6, "gamma": 0.2}], "full")
    assert avg == pytest.approx({"alpha": 0.4, "gamma": 0.3})


# --------------------------------------------------------------------------------------------
# decoding, prefill reuse, objective
# --------------------------------------------------------------------------------------------
def test_greedy_runner_matches_generate(llama, tok_vocab):
    tok, _ = tok_vocab
    r = F.PromptRunner(llama, tok, F.question_prompt("Who is it?"), 8, stop_at_newline=False)
    got = r.generate([None, None])
    with torch.no_grad():
        ref = llama.generate(r.ids, max_new_tokens=8, do_sample=False)[0, r.n:].tolist()
    assert got[0] == got[1]
    stop = next((i for i, t in enumerate(ref) if t == tok.eos_token_id), len(ref))
    assert got[0] == ref[:stop]


def test_prefill_reuse_generated_gating_equals_fresh_prefill(llama, tok_vocab):
    tok, _ = tok_vocab
    ref = F.compute_reference(llama, tok, "What is the capital of Italy?", "Rome", "Rome is a city in Italy.")
    plan = F.fusion_plan(ref, llama, {"alpha": 1.0, "gamma": 1.0}, gating="generated")
    prompt = F.question_prompt(ref.question)
    reuse = F.PromptRunner(llama, tok, prompt, 6, stop_at_newline=False)
    fresh = F.PromptRunner(llama, tok, prompt, 6, stop_at_newline=False, reuse_prefill=False)
    base = fresh.generate([None])[0]
    with attach(llama, {"p": plan}, backend="torch") as h:
        a = reuse.generate(["p", None], h)
        b = fresh.generate(["p", None], h)
        # the last prompt token is steered too: its logits differ from the unsteered ones
        h.route(["p"])
        h.set_prompt_length(reuse.n - 1)
        with torch.no_grad():
            steered_last = llama(input_ids=reuse.ids).logits[0, -1]
        h.set_prompt_length(None)
        nll_a = reuse.nll(a, h)
        nll_b = fresh.nll(a, h)
    with torch.no_grad():
        plain_last = llama(input_ids=reuse.ids).logits[0, -1]
    assert a == b and a[1] == base and a[0] != base
    assert not torch.allclose(steered_last, plain_last)
    assert nll_a == pytest.approx(nll_b, rel=1e-4)
    # the NLL is the unsteered one: equal to a plain forward by hand
    seq = torch.tensor([reuse.ids[0].tolist() + a[0]])
    with torch.no_grad():
        lp = torch.log_softmax(llama(input_ids=seq).logits[0].float(), -1)
    hand = -torch.stack([lp[reuse.n - 1 + j, t] for j, t in enumerate(a[0])]).mean()
    assert nll_a[0] == pytest.approx(float(hand), rel=1e-4)


def test_objective_and_normalisation():
    assert F.repetition_rate([5, 5, 5, 5, 5]) == pytest.approx(1 - 1 / 4)
    assert F.repetition_rate([1, 2, 3, 4]) == 0.0 and F.repetition_rate([7, 7]) == 0.0
    assert F.objective_score(0.5, 0.0, lam=0.3, repetition=0.75) == pytest.approx(0.5 - 0.3 * 0.75)
    assert F.normalized_perplexity(0.0) == 0.0
    assert F.normalized_perplexity(math.log(1000.0) / 2) == pytest.approx(0.5)
    assert F.normalized_perplexity(50.0) == 1.0 and F.normalized_perplexity(float("nan")) == 1.0
    assert F.objective_score(0.8, math.log(1000.0) / 2, lam=0.3) == pytest.approx(0.8 - 0.15)
    with pytest.raises(F.FusionError):
        F.normalized_perplexity(1.0, ppl_cap=1.0)


def test_prompt_search_attaches_once_and_scores(llama, tok_vocab, monkeypatch):
    tok, _ = tok_vocab
    ref = F.compute_reference(llama, tok, "What is the largest planet?", "Jupiter", None)
    calls = {"attach": 0}
    from fusesteer.methods.fusion import search as S

    real_attach = S.attach

    def counting_attach(*a, **k):
        calls["attach"] += 1
        return real_attach(*a, **k)

    monkeypatch.setattr(S, "attach", counting_attach)
    res = F.optimize_prompt(llama, tok, ref, ["Jupiter"], n_trials=5, mode="full", batch_size=2,
                            max_new_tokens=4, progress=False)
    assert calls["attach"] == 1 and res["n_complete"] == 5 and len(res["values"]) == 5
    attrs = res["best_attrs"]
    want = G.token_overlap(attrs["answer"], ["Jupiter"]) - 0.3 * max(attrs["ppl_norm"], attrs["repetition"])
    assert res["best_value"] == pytest.approx(want) and res["best_value"] == max(res["values"])
    assert res["plan"].metadata["params"] == pytest.approx(res["best_params"])
    assert getattr(llama, "_fusesteer_handle", None) is None  # detached afterwards
    # the interpolated-patching blend with generated gating (prefill reuse) runs through the same search
    res = F.optimize_prompt(llama, tok, ref, ["Jupiter"], n_trials=3, mode="segmented", blend="interp",
                            gating="generated", batch_size=3, max_new_tokens=3, progress=False)
    assert res["n_complete"] == 3 and res["plan"].metadata["steer_from"] == "last_prompt_token"
    assert all(e.gating == "generated" and e.a is not None for e in res["plan"].entries)


# --------------------------------------------------------------------------------------------
# studies: resume, stale trials, two workers
# --------------------------------------------------------------------------------------------
SPACE = {"alpha": (0.0, 1.0), "gamma": (0.01, 1.0)}


def _toy(params_list):
    return [(-(p["alpha"] - 0.3) ** 2 - (p["gamma"] - 0.5) ** 2, {"tag": "toy"}) for p in params_list]


def _states(study):
    import optuna

    c = {}
    for t in study.get_trials(deepcopy=False):
        c[t.state.name] = c.get(t.state.name, 0) + 1
    nums = [t.number for t in study.get_trials(deepcopy=False)]
    assert len(nums) == len(set(nums))
    return c, {t.number: (t.params, t.value) for t in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}


def test_resume_after_crash_loses_no_trial(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    calls = {"n": 0}

    def crashing(params_list):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return _toy(params_list)

    with pytest.raises(RuntimeError, match="simulated crash"):
        F.run_study(crashing, SPACE, study_name="s", storage=url, n_trials=8, progress=False)
    import optuna

    study = optuna.load_study(study_name="s", storage=url)
    counts, before = _states(study)
    assert counts == {"COMPLETE": 3, "FAIL": 1}
    study = F.run_study(_toy, SPACE, study_name="s", storage=url, n_trials=8, progress=False)
    counts, after = _states(study)
    assert counts == {"COMPLETE": 8, "FAIL": 1}
    assert all(after[k] == v for k, v in before.items())  # the first 3 COMPLETE trials are kept as they were
    # once complete, a rerun runs nothing
    F.run_study(_toy, SPACE, study_name="s", storage=url, n_trials=8, progress=False)
    assert _states(optuna.load_study(study_name="s", storage=url))[0] == {"COMPLETE": 8, "FAIL": 1}
    # settings are pinned to the study
    F.run_study(_toy, SPACE, study_name="c", storage=url, n_trials=1, progress=False, config={"lam": 0.3})
    with pytest.raises(F.FusionError, match="lam"):
        F.run_study(_toy, SPACE, study_name="c", storage=url, n_trials=2, progress=False, config={"lam": 0.5})


def test_resume_with_running_trial_left_by_dead_process(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'r.db'}"
    F.run_study(_toy, SPACE, study_name="r", storage=url, n_trials=2, progress=False)
    # a "killed" worker: a RUNNING trial with a heartbeat that stops
    st = F.make_storage(url, heartbeat_interval=1, grace_period=1)
    study = optuna.load_study(study_name="r", storage=st)
    dead = study.ask()
    st.record_heartbeat(dead._trial_id)
    t0 = time.time()
    study = F.run_study(_toy, SPACE, study_name="r", storage=st, n_trials=5, progress=False, poll_interval=0.2)
    counts, _ = _states(study)
    assert counts == {"COMPLETE": 5, "FAIL": 1}  # the stale trial was failed and its slot re-run
    assert study.get_trials(deepcopy=False)[dead.number].state == optuna.trial.TrialState.FAIL
    assert time.time() - t0 < 30
    # without heartbeats, fail_running clears a RUNNING leftover at once
    st2 = F.make_storage(url, heartbeat_interval=None)
    s2 = optuna.load_study(study_name="r", storage=st2)
    s2.ask()
    study = F.run_study(_toy, SPACE, study_name="r", storage=st2, n_trials=6, progress=False, fail_running=True)
    assert _states(study)[0] == {"COMPLETE": 6, "FAIL": 2}


WORKER = textwrap.dedent("""
    import os, sys, time
    from fusesteer.methods.fusion import run_study
    url, worker, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    open(os.path.join(ready, f"w{worker}"), "w").close()
    while len(os.listdir(ready)) < 2:
        time.sleep(0.05)
    def ev(ps):
        time.sleep(0.15)
        return [(-(p["alpha"] - 0.3) ** 2, {"pid": os.getpid()}) for p in ps]
    run_study(ev, {"alpha": (0.0, 1.0), "gamma": (0.01, 1.0)}, study_name="shared", storage=url, n_trials=14,
              worker=worker, batch_size=1 + 2 * worker, progress=False, poll_interval=0.05)
""")


def test_two_workers_share_one_sqlite_study(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'w.db'}"
    F.make_storage(url)  # create the schema once, before the workers race
    ready = tmp_path / "ready"
    ready.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, str(w), str(ready)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for w in (0, 1)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    study = optuna.load_study(study_name="shared", storage=url)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 14
    assert len({t.number for t in trials}) == len(trials)
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    assert len({t.user_attrs["pid"] for t in complete}) == 2  # both workers contributed


# --------------------------------------------------------------------------------------------
# grading
# --------------------------------------------------------------------------------------------
def test_normalisation_and_overlap():
    assert G.normalize_answer("The  U.S. Army's  answer!") == "us armys answer"
    assert G.extract_answer("  Paris is the capital.\nQuestion: next") == "Paris is the capital."
    assert G.extract_answer("\n\n Rome Question: x") == "Rome"
    assert G.token_f1("Paris", "paris.") == 1.0
    assert G.token_f1("the capital is Paris", "Paris") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert G.token_f1("", "") == 1.0 and G.token_f1("a", "Paris") == 0.0  # "a" normalises to nothing
    assert G.token_f1("Rome", "Paris") == 0.0
    assert G.token_overlap("Justin Trudeau", ["Mark Carney", "Justin Trudeau"]) == 1.0
    with pytest.raises(G.GradingError):
        G.token_overlap("x", [])


def test_rule_judge_hand_cases():
    j = G.RuleJudge()
    s = j.score("Who is the Canadian prime minister?", "Justin Trudeau", ["Justin Trudeau"])
    assert (s.factual, s.coherence, s.relevance) == (1.0, 1.0, 1.0) and s.judge == 1.0
    s = j.score("Who is the Canadian prime minister?", "The Canadian prime minister is Stephen Harper",
                ["Justin Trudeau"])
    assert s.factual == 0.0 and s.coherence == 1.0
    assert s.relevance == 1.0  # 3/3 question content words ("canadian", "prime", "minister") → min(1, 2·1)
    assert s.judge == pytest.approx(0.5)
    s = j.score("Is the sky blue?", "yes yes yes yes", ["Yes"])
    # bigrams (yes,yes)x3 → distinct 1/3; a run of 4 → ×0.5
    assert s.factual == 1.0 and s.coherence == pytest.approx(1 / 6)
    assert j.score("q?", "", ["x"]).judge == 0.0
    s = j.score("What river?", "No, it is not", ["Yes"])
    assert s.factual == 0.0


def test_composite_accurate_threshold_and_grades():
    g = G.grade("Who is the Canadian prime minister?", "Justin Trudeau", ["Justin Trudeau"])
    assert g.composite == 1.0 and g.accurate and g.simpleqa == "CORRECT"
    g = G.grade("Who is the Canadian prime minister?", "Stephen Harper", ["Justin Trudeau"])
    assert not g.accurate and g.simpleqa == "INCORRECT"
    # verbose but right: F1 2/9·… mixed with a perfect judge
    g = G.grade("Who is the Canadian prime minister?",
                "The current prime minister of Canada is Justin Trudeau since 2015", ["Justin Trudeau"])
    f1 = 2 * (2 / 10) * 1 / (2 / 10 + 1)
    assert g.overlap == pytest.approx(f1) and g.composite == pytest.approx(0.5 * f1 + 0.5 * 1.0)
    assert g.accurate  # 0.5·0.333 + 0.5 = 0.667 ≥ 0.6


def test_simpleqa_grade_cases():
    sg = G.simpleqa_grade
    assert sg("I don't know.", ["Paris"]) == "NOT_ATTEMPTED"
    assert sg("I\u2019m not sure, sorry", ["Paris"]) == "NOT_ATTEMPTED"
    assert sg("", ["Paris"]) == "NOT_ATTEMPTED"
    assert sg("I think it is Paris, but I'm not sure", ["Paris"]) == "CORRECT"  # hedged but answered
    assert sg("Lyon", ["Paris"]) == "INCORRECT"
    assert sg("It happened in 1998", ["1999"]) == "INCORRECT"
    assert sg("It happened in 1,999.", ["1999"]) == "CORRECT"
    assert sg("Yes, because it is.", ["Yes"]) == "CORRECT"
    assert sg("No.", ["Yes"]) == "INCORRECT"
    assert sg("It depends.", ["Yes"]) == "NOT_ATTEMPTED"
    long_truth = ["Canada does not have a president but rather has a prime minister."]
    assert sg("Canada has no president; it has a prime minister.", long_truth) == "CORRECT"
    assert sg("The president of Canada is Justin Trudeau.", long_truth) == "INCORRECT"
    s = G.summarize([G.grade("q?", "Paris", ["Paris"]), G.grade("q?", "I don't know", ["Paris"])])
    assert s["n"] == 2 and s["accurate"] == 1 and s["simpleqa"] == {"CORRECT": 1, "INCORRECT": 0, "NOT_ATTEMPTED": 1}


def test_parse_judge_scores():
    p = G.parse_judge_scores
    assert p("factual=7 coherence=8 relevance=9") == (7, 8, 9)
    assert p("Relevance: 3\nFactual accuracy: 10\nCoherence - 2") == (10, 2, 3)
    assert p("scores 4, 5, 6") == (4, 5, 6)
    assert p("factual=11 coherence=8 relevance=9") is None
    assert p("1 2") is None and p("7 7 7 7") is None and p("garbage") is None


def _save_tiny_folder(path, tiny_models):
    model = tiny_models("llama")
    tok, _ = word_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_models):
    return _save_tiny_folder(tmp_path_factory.mktemp("tiny_llama"), tiny_models)


def test_hf_judge_garbage_output_falls_back(tiny_folder, tiny_models):
    judge = G.HFJudge(str(tiny_folder), max_new_tokens=6)
    s = judge.score("What is the capital of France?", "Paris", ["Paris"])
    rule = G.RuleJudge().score("What is the capital of France?", "Paris", ["Paris"])
    assert s.parse_failed and s.raw is not None and s.source.startswith("rule")
    assert (s.factual, s.coherence, s.relevance) == (rule.factual, rule.coherence, rule.relevance)
    tok, _ = word_tokenizer()
    z = G.HFJudge(tiny_models("llama"), tok, max_new_tokens=4, on_failure="zero").score("q?", "a", ["b"])
    assert z.parse_failed and z.judge == 0.0
    with pytest.raises(G.GradingError, match="could not be parsed"):
        G.HFJudge(tiny_models("llama"), tok, max_new_tokens=4, on_failure="raise").score("q?", "a", ["b"])
    g = G.grade("What is the capital of France?", "Paris", ["Paris"], judge)
    assert g.parse_failed and g.accurate


def test_hf_judge_parses_a_scripted_model(tiny_models):
    """A judge whose 'model' emits a fixed score string is parsed and mapped to (s - 1) / 9."""
    tok, vocab = word_tokenizer()

    class Scripted(G.HFJudge):
        def _generate(self, text):
            assert "Reference answer: Paris" in text and "Candidate answer: Lyon" in text
            return "factual=1 coherence=10 relevance=4"

    s = Scripted(tiny_models("llama"), tok).score("q?", "Lyon", ["Paris"])
    assert not s.parse_failed and (s.factual, s.coherence, s.relevance) == (0.0, 1.0, pytest.approx(1 / 3))


# --------------------------------------------------------------------------------------------
# explanations, 8-bit, CLI
# --------------------------------------------------------------------------------------------
def test_explanations(llama, tok_vocab):
    tok, _ = tok_vocab
    rec = {"id": "x", "question": "Is Rome in Italy?", "answer": "Yes", "explanation": "Rome is a city in Italy."}
    assert F.explanation_for(rec, "auto") == ("Rome is a city in Italy.", "dataset")
    gen, src = F.explanation_for(rec, "generate", llama, tok, max_new_tokens=5)
    assert src == "generated" and isinstance(gen, str) and len(gen.split()) <= 5
    assert gen == F.generate_explanation(llama, tok, rec["question"], "Yes", max_new_tokens=5)  # greedy
    with pytest.raises(F.FusionError, match="no 'explanation'"):
        F.explanation_for({"question": "q?", "answers": ["a"]}, "dataset")
    assert F.truths_of({"question": "q", "answers": [" A ", "B"]}) == ["A", "B"]
    assert F.truths_of({"question": "q", "choices": ["x", "y"], "answer_index": 1}) == ["y"]


def test_8bit_model_end_to_end(tiny_folder, tmp_path):
    pytest.importorskip("bitsandbytes")
    from fusesteer.models import load

    model, tok = load(str(tiny_folder), quantization="8bit", progress=False)
    assert any(type(m).__name__ == "Linear8bitLt" for m in model.modules())
    ref = F.compute_reference(model, tok, "What is the capital of France?", "Paris", "Paris is a city.")
    assert torch.isfinite(ref.delta).all()
    res = F.optimize_prompt(model, tok, ref, ["Paris"], n_trials=2, mode="segmented", batch_size=2,
                            max_new_tokens=3, progress=False, storage=f"sqlite:///{tmp_path / 'q.db'}")
    assert res["n_complete"] == 2 and math.isfinite(res["best_value"])


def test_cli_optimize_and_eval(tiny_folder, tmp_path, capsys):
    from fusesteer.cli import build_parser, main

    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"id": "q1", "question": "What is the capital of France?", "answers": ["Paris"]},
        {"id": "q/2", "question": "What is the largest planet?", "answers": ["Jupiter"]},
    ]) + "\n")
    out = tmp_path / "run"
    rc = main(["fusion", "optimize", "--model", str(tiny_folder), "--dataset", str(data), "--trials", "3",
               "--mode", "full", "segmented", "--max-new-tokens", "3", "--batch", "2", "--out", str(out),
               "--all-prompts", "--no-progress", "--explanation", "generate"])
    assert rc == 0
    assert sorted(p.name for p in (out / "plans").iterdir()) == sorted(
        f"{s}.{m}.explanation.safetensors" for s in ("q1", safe_id("q/2")) for m in ("full", "segmented"))
    res = json.loads((out / "results" / "q1.segmented.explanation.json").read_text())
    assert res["n_complete"] == 3 and set(res["best_params"]) == set(F.param_space("segmented"))
    assert (out / "studies.db").is_file()
    # rerun resumes: nothing new to do, same best
    assert main(["fusion", "optimize", "--model", str(tiny_folder), "--dataset", str(data), "--trials", "3",
                 "--mode", "segmented", "--max-new-tokens", "3", "--out", str(out), "--all-prompts",
                 "--no-progress", "--explanation", "generate"]) == 0
    assert json.loads((out / "results" / "q1.segmented.explanation.json").read_text())["best_value"] == \
        res["best_value"]
    ev = tmp_path / "ev"
    assert main(["fusion", "eval", "--model", str(tiny_folder), "--dataset", str(data), "--plans", str(out),
                 "--out", str(ev), "--no-progress"]) == 0
    rep = json.loads((ev / "fusion_eval.json").read_text())
    assert rep["n_prompts"] == 2 and rep["arms"][:3] == ["baseline", "full", "full (avg α/γ)"]
    assert "segmented (avg α/γ)" in rep["arms"]
    assert (ev / "fusion_eval.png").stat().st_size > 1000
    assert "| baseline |" in (ev / "fusion_eval.md").read_text() or rep["n_baseline_failed"] == 0
    # bad input → clear error, exit code 2
    assert main(["fusion", "eval", "--model", str(tiny_folder), "--plans", str(tmp_path / "none"),
                 "--out", str(ev), "--no-progress"]) == 2
    assert "no results" in capsys.readouterr().err
    helptext = build_parser()._subparsers._group_actions[0].choices["fusion"].format_help()
    assert "optimize" in helptext and "eval" in helptext


# --------------------------------------------------------------------------------------------
# no steering is always a candidate
# --------------------------------------------------------------------------------------------
def test_fusion_never_keeps_a_plan_below_no_steering(llama, tok_vocab, tmp_path, monkeypatch):
    tok, _ = tok_vocab
    q = "What is the largest planet?"
    runner = F.PromptRunner(llama, tok, F.question_prompt(q), 4)
    toks = runner.generate([None])[0]
    unsteered = G.extract_answer(runner.decode(toks))
    assert unsteered
    ref = F.compute_reference(llama, tok, q, "Jupiter", None)
    # the truth is what the unsteered model says: no steering scores overlap 1 on the real objective
    res = F.optimize_prompt(llama, tok, ref, [unsteered], n_trials=4, mode="full", batch_size=2, max_new_tokens=4,
                            progress=False)
    ua = res["unsteered_attrs"]
    assert ua["answer"] == unsteered and ua["overlap"] == 1.0
    assert res["unsteered_value"] == pytest.approx(1.0 - 0.3 * max(ua["ppl_norm"], ua["repetition"]))
    assert res["kept_value"] == max(res["best_value"], res["unsteered_value"]) >= res["unsteered_value"]
    if res["kept"] == "unsteered":
        assert res["best_value"] <= res["unsteered_value"] and res["plan"].entries == []
    else:
        assert res["best_value"] > res["unsteered_value"] and res["plan"].entries
    assert res["plan"].metadata["kept"] == res["kept"]
    # forced: every trial below no steering -> no steering kept; every trial above -> the best trial kept
    from fusesteer.methods.fusion import search as S

    real = S.PromptSearch.evaluate
    for offset, kept in ((-5.0, "unsteered"), (5.0, "steered")):
        monkeypatch.setattr(S.PromptSearch, "evaluate",
                            lambda self, ps, o=offset: [(v + o, a) for v, a in real(self, ps)])
        r = F.optimize_prompt(llama, tok, ref, ["Jupiter"], n_trials=2, mode="full", batch_size=2, max_new_tokens=3,
                              progress=False)
        assert r["kept"] == kept and bool(r["plan"].entries) == (kept == "steered")
    # through the pipeline: the result, the summary count and the evaluation report say so
    monkeypatch.setattr(S.PromptSearch, "evaluate", lambda self, ps: [(v - 5.0, a) for v, a in real(self, ps)])
    recs = [{"id": "p1", "question": q, "answers": ["Jupiter"]}]
    summary = F.optimize_records(llama, tok, recs, tmp_path / "run", modes=["full"], n_trials=2, max_new_tokens=3,
                                 batch_size=2, only_failed=False, progress=False)
    assert summary["kept_unsteered"] == [1, 1] and summary["records"][0]["runs"][0]["kept"] == "unsteered"
    result = json.loads((tmp_path / "run" / "results" / "p1.full.explanation.json").read_text())
    assert result["kept"] == "unsteered" and result["kept_answer"] == result["unsteered_attrs"]["answer"]
    report = F.evaluate_run(llama, tok, tmp_path / "run", average=False, progress=False)
    assert report["kept_unsteered"] == {"full": [1, 1]}
    arms = report["items"][0]["arms"]
    assert arms["full"]["answer"] == arms["baseline"]["answer"]  # the kept (empty) plan answers unsteered
    md = open(F.write_report(report, tmp_path / "ev")["md"]).read()
    assert "kept no steering" in md and "full: 1/1" in md
