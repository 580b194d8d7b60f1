"""AUSteer as its authors run it: the letter / Yes-No templates, generated-answer scoring, the official pairs,
the tie rule, a planted unit under the official protocol, and the CLI's --protocol / --scoring generate."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tok_models
from transformers import PreTrainedTokenizerFast

from fusesteer import attach, cli
from fusesteer.evaluate import generate as GEN
from fusesteer.evaluate import tasks
from fusesteer.methods import austeer as A
from fusesteer.methods import pairs as P
from fusesteer.testing import tiny

torch.set_num_threads(1)

YN = [{"id": "y1", "question": "Is water wet?", "answer": "Yes"},
      {"id": "n1", "question": "Is fire cold?", "answer": "No"}]
MC = [{"id": "m3", "question": "Which is a fruit?", "choices": ["Apple", "Chair", "Stone"], "answer_index": 0},
      {"id": "m2", "question": "Which is the cause?", "choices": ["It rained.", "The grass got wet."],
       "answer_index": 0}]


def _order(rid, n):
    """The option order of the letter template, as documented: random.Random(f"options:{id}").shuffle."""
    o = list(range(n))
    random.Random(f"options:{rid}").shuffle(o)
    return o


def test_letter_template_by_hand():
    f = GEN.format_task(YN[0], "yesno")
    assert f.prompt == "Answer the question with 'yes' or 'no'.\n\nQuestion: Is water wet?\n\nAnswer:"
    assert (f.accepted, f.continuations, f.gold) == ((("yes",), ("no",)), ("Yes", "No"), 0)
    assert GEN.format_task(YN[1], "yesno").gold == 1
    o = _order("m3", 3)
    f = GEN.format_task(MC[0], "mc")
    ch = MC[0]["choices"]
    assert f.prompt == ("Answer with the letter of the correct option (A, B or C).\n\nQuestion: Which is a fruit?\n"
                        f"A. {ch[o[0]]}\nB. {ch[o[1]]}\nC. {ch[o[2]]}\nAnswer:")
    assert f.continuations == ("A", "B", "C") and f.gold == o.index(0)
    assert f.accepted[f.gold] == ("abc"[f.gold], "apple")
    # the listed order differs between records (the bundled files put the right choice first)
    golds = {GEN.format_task(r, "mc").gold for r in tasks.load_dataset("truthfulqa_mc", limit=20)}
    assert len(golds) > 1
    two = GEN.format_task(MC[1], "mc")
    assert "(A or B)" in two.prompt
    cloze = GEN.format_task(MC[0], "mc", "cloze")
    assert cloze.prompt == "Question: Which is a fruit?\nAnswer:" and cloze.accepted[0] == ("apple",)


@pytest.mark.parametrize("out,want", [
    (" A", 0), ("a", 0), ("  b\n", 1), ("B ", 1), ("apple", 0), (" APPLE\t", 0),  # letter, case, whitespace, text
    ("The answer is A", -1), ("A.", -1), ("", -1), ("D", -1), ("app", -1),  # non-answers
])
def test_generated_answer_matching(out, want):
    accepted = (("a", "apple"), ("b", "chair"), ("c", "stone"))
    assert GEN.match(out, accepted) == want


def test_generated_scoring_counts_non_answers(monkeypatch):
    recs = [{"id": f"r{i}", "question": f"q{i}?", "answer": a} for i, a in enumerate(["Yes", "No", "Yes", "No"])]
    outs = [" Yes", "no", " maybe", " YES"]  # right, right, non-answer, wrong
    monkeypatch.setattr(GEN, "generate_continuations", lambda m, t, prompts, **kw: outs[:len(prompts)])
    res = tasks.evaluate(None, None, recs, method="generate", progress=False)
    assert (res.correct, res.n, res.non_answers) == (2, 4, 1)
    assert [it.pred for it in res.items] == [0, 1, -1, 0] and res.items[2].non_answer
    assert "| non-answers |" in res.table() and res.to_dict()["non_answers"] == 1
    with pytest.raises(tasks.EvaluationError, match="scored by generation"):
        tasks.evaluate(None, None, recs, method="logprob", template="letter")


def test_official_pairs_equal_hand_built():
    got = P.make_pairs(YN, seed=3, template="letter") + P.make_pairs(MC, negatives="random", seed=3, template="letter")
    yn_p = ["Answer the question with 'yes' or 'no'.\n\nQuestion: Is water wet?\n\nAnswer:",
            "Answer the question with 'yes' or 'no'.\n\nQuestion: Is fire cold?\n\nAnswer:"]
    o3, o2 = _order("m3", 3), _order("m2", 2)
    gold3 = "ABC"[o3.index(0)]
    wrong3 = random.Random("3:m3").choice([i for i in range(3) if i != o3.index(0)])
    p3 = ("Answer with the letter of the correct option (A, B or C).\n\nQuestion: Which is a fruit?\n"
          + "".join(f"{'ABC'[i]}. {MC[0]['choices'][j]}\n" for i, j in enumerate(o3)) + "Answer:")
    p2 = ("Answer with the letter of the correct option (A or B).\n\nQuestion: Which is the cause?\n"
          + "".join(f"{'AB'[i]}. {MC[1]['choices'][j]}\n" for i, j in enumerate(o2)) + "Answer:")
    gold2 = "AB"[o2.index(0)]
    want = [P.ContrastivePair("y1", yn_p[0], "Yes", "No"), P.ContrastivePair("n1", yn_p[1], "No", "Yes"),
            P.ContrastivePair("m3", p3, gold3, "ABC"[wrong3]),
            P.ContrastivePair("m2", p2, gold2, "B" if gold2 == "A" else "A")]
    assert got == want
    assert got[0].positive_text.endswith("Answer:Yes")  # the authors concatenate prompt + answer
    assert P.make_pairs(MC, template="letter", limit=1) == P.make_pairs(MC, template="letter")[:1]
    with pytest.raises(P.PairsError, match="template"):
        P.make_pairs(YN, template="letters")


def test_tie_rule_paper_and_code():
    r_pos = torch.tensor([0.5, 0.7, 0.2])
    r_neg = torch.tensor([0.5, 0.2, 0.7])
    assert A.austeer_gammas(r_pos, r_neg, 10.0).tolist() == pytest.approx([-5.0, 7.0, -7.0])
    assert A.austeer_gammas(r_pos, r_neg, 10.0, ties="code").tolist() == pytest.approx([5.0, 7.0, -7.0])
    with pytest.raises(A.AUSteerError, match="ties"):
        A.austeer_gammas(r_pos, r_neg, 1.0, ties="both")


# --------------------------------------------------------------------------------------------
# a planted unit under the official protocol
# --------------------------------------------------------------------------------------------
PLANTED = [{"id": f"p{i}", "question": q, "answer": "Yes"} for i, q in enumerate(
    ["Is the sky blue?", "Is snow white?", "Is grass green?", "Do fish swim?", "Do birds fly?", "Is ice cold?"])]
UNIT = 5  # the hidden dim the planted unit writes


def _planted_tokenizer():
    words = set()
    for r in PLANTED:
        f = GEN.format_task(r, "yesno")
        words.update(pre_tokenizers.Whitespace().pre_tokenize_str(f.prompt + " Yes No"))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w, _ in sorted(words, key=lambda x: x[0]):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>"), vocab


def _planted_model(vocab):
    """Attention and every MLP write nothing, except one path of the last MLP: a neuron that fires on tokens whose
    embedding has feature 0 > 0 ("Yes": +4, the prompt's final ":": +1, "No": -4) and writes hidden dim UNIT. The LM
    head reads UNIT for "Yes" and feature 1 (set on ":") plus 0.9 * UNIT for "No": unsteered, the answer is "No";
    scaling the unit enough makes it "Yes". Every other AU's momentum is exactly zero."""
    m = tiny("llama", seed=3, tie_word_embeddings=False)
    yes, no, colon = vocab["Yes"], vocab["No"], vocab[":"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
        emb = m.model.embed_tokens.weight
        emb.copy_(0.1 * torch.randn(emb.shape, generator=g))
        emb[:, [0, 1, UNIT]] = 0.0
        emb[yes, 0], emb[no, 0], emb[colon, 0], emb[colon, 1] = 4.0, -4.0, 1.0, 2.0
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        mlp = m.model.layers[-1].mlp
        mlp.gate_proj.weight.zero_()
        mlp.up_proj.weight.zero_()
        mlp.gate_proj.weight[0, 0] = 1.0
        mlp.up_proj.weight[0, 0] = 1.0
        mlp.down_proj.weight[UNIT, 0] = 1.0
        head = m.lm_head.weight
        head.zero_()
        head[yes, UNIT], head[no, 1], head[no, UNIT] = 1.0, 1.0, 0.9
    return m


@pytest.fixture(scope="module")
def planted():
    tok, vocab = _planted_tokenizer()
    return _planted_model(vocab), tok


def test_planted_unit_official_protocol(planted):
    model, tok = planted
    prs = P.make_pairs(PLANTED, template="letter")
    assert all(p.positive == "Yes" and p.negative == "No" for p in prs)
    loc = A.localize(model, tok, prs, "ffn", batch_size=4)
    li, d = A.rank_units(loc.stats.score_counts, 3)
    L = model.config.num_hidden_layers
    assert (loc.stats.layers[int(li[0])], int(d[0])) == (L - 1, UNIT)
    assert loc.stats.r_pos[li[0], d[0]] == 1.0 and int(loc.stats.score_counts[li[1], d[1]]) == 0
    van = tasks.evaluate(model, tok, PLANTED, method="generate", progress=False)
    assert van.correct == 0 and van.non_answers == 0 and {it.output.strip() for it in van.items} == {"No"}
    plan = A.austeer_plan(loc, 1, 10.0)
    assert plan.metadata["units"][0]["gamma"] == pytest.approx(10.0)
    with attach(model, plan, backend="torch"):
        steered = tasks.evaluate(model, tok, PLANTED, method="generate", progress=False)
    assert steered.correct == len(PLANTED) and {it.output.strip() for it in steered.items} == {"Yes"}


def test_cli_official_protocol_sweep_and_eval(planted, tmp_path, capsys):
    model, tok = planted
    d = tmp_path / "planted"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    data = tmp_path / "yes.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PLANTED))
    out = tmp_path / "sw"
    rc = cli.main(["austeer", "sweep", "--protocol", "official", "--model", str(d), "--dataset", str(data),
                   "--val", "3", "--site", "ffn", "--k", "1", "2", "--alpha", "0.01", "10", "--out", str(out),
                   "--quiet"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["vanilla_accuracy"] == 0.0 and res["best"]["accuracy"] == 1.0 and res["best"]["alpha"] == 10.0
    assert res["info"]["validation"]["scoring"] == "generate" and res["info"]["pairs"]["template"] == "letter"
    assert res["info"]["pairs"]["requested"] == 1000 and res["info"]["pairs"]["shortfall"] == 997
    assert res["non_answers"] == [[0, 0], [0, 0]]
    assert "--protocol official" in res["reproduce"]["command"]
    err = capsys.readouterr().err
    assert "--pairs 1000 asked, 3 used" in err
    argv = res["reproduce"]["argv"][1:]
    argv[argv.index("-o") + 1] = str(tmp_path / "p.safetensors")
    assert cli.main(argv + ["--quiet"]) == 0
    rc = cli.main(["eval", "--model", str(d), "--dataset", str(data), "--plan", str(tmp_path / "p.safetensors"),
                   "--scoring", "generate", "--json", str(tmp_path / "e.json"), "--quiet"])
    assert rc == 0
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["accuracy"] == 1.0 and ev["method"] == "generate" and ev["non_answers"] == 0
    assert "non-answers" in capsys.readouterr().out
    # the baselines sweep under the same protocol; the official protocol refuses --negatives all
    rc = cli.main(["baseline", "sweep", "--method", "random", "--protocol", "official", "--model", str(d),
                   "--dataset", str(data), "--val", "3", "--k", "1", "--alpha", "1", "10", "--out",
                   str(tmp_path / "rnd"), "--quiet"])
    assert rc == 0
    rr = json.loads((tmp_path / "rnd" / "results.json").read_text())
    assert rr["info"]["protocol"] == "official" and rr["info"]["validation"]["scoring"] == "generate"
    rc = cli.main(["austeer", "build", "--protocol", "official", "--negatives", "all", "--model", str(d),
                   "--dataset", str(data), "--val", "0", "-o", str(tmp_path / "x.safetensors"), "--quiet"])
    assert rc == 2 and "one pair per record" in capsys.readouterr().err
