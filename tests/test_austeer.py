"""AUSteer builder, pairs, baselines, sweep and CLI on tiny models (no downloads).

The hand computations below use explicit Python loops over planted activations, not the builder's
vectorised code, so a mistake in either shows up as a mismatch.
"""

from __future__ import annotations

import json

import pytest
import torch

from fusesteer import attach, cli
from fusesteer.evaluate import tasks
from fusesteer.methods import austeer as A
from fusesteer.methods import baselines as B
from fusesteer.methods import pairs as P
from fusesteer.methods import sweep as SW
from fusesteer.methods.capture import site_recorder
from fusesteer.runtime.plan import ModelSpec, SteeringPlan
from fusesteer.testing import tiny, word_tokenizer

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def yn():
    return tasks.load_dataset("strategyqa", limit=40)


@pytest.fixture(scope="module")
def mc():
    return tasks.load_dataset("truthfulqa_mc", limit=12)


def _word_tokenizer(records, size=128):
    return word_tokenizer([t for r in records for t in [tasks.format_prompt(r)] + tasks.choice_texts(r)], size)


@pytest.fixture(scope="module")
def tok(yn, mc):
    return _word_tokenizer(yn + mc)


@pytest.fixture(scope="module")
def model():
    return tiny("llama")  # 3 layers, hidden 64, intermediate 96, 4 heads x 16, vocab 128


@pytest.fixture(scope="module")
def yn_pairs(yn):
    return P.make_pairs(yn[:24])


@pytest.fixture(scope="module")
def head_loc(model, tok, yn_pairs):
    return A.localize(model, tok, yn_pairs, "head", batch_size=5, extra={"iti": B.HeadStats(4)},
                      provenance=A.provenance("strategyqa", yn_pairs, 0))


SPEC = ModelSpec(model_type="llama", num_layers=3, hidden_size=6, intermediate_size=8, attn_width=6)


def _planted(n=9, L=3, W=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    # small integers so that exact ties m == 0 occur
    pos = torch.randint(-3, 4, (n, L, W), generator=g).float()
    neg = torch.randint(-3, 4, (n, L, W), generator=g).float()
    return pos, neg


def _batches(pos, neg, sizes):
    out, s = [], 0
    for b in sizes:
        out.append((pos[s:s + b], neg[s:s + b]))
        s += b
    assert s == pos.shape[0]
    return out


def _hand_stats(pos, neg):
    n, L, W = pos.shape
    rp = [[0.0] * W for _ in range(L)]
    rn = [[0.0] * W for _ in range(L)]
    mm = [[0.0] * W for _ in range(L)]
    for l in range(L):
        for i in range(W):
            cp = cn = 0
            tot = 0.0
            for j in range(n):
                m = float(pos[j, l, i]) - float(neg[j, l, i])
                cp += m > 0
                cn += m < 0
                tot += m
            rp[l][i], rn[l][i], mm[l][i] = cp / n, cn / n, tot / n
    return rp, rn, mm


def _loc_from(pos, neg, sizes=(4, 4, 1), spec=SPEC, site="attn.o_proj.in"):
    st = A.accumulate(_batches(pos, neg, sizes))
    return A.Localization(st, site, spec, {"dataset": "planted"})


# --------------------------------------------------------------------------------------------
# statistics, ranking, gamma: by hand
# --------------------------------------------------------------------------------------------
def test_momentum_stats_match_hand_computation():
    pos, neg = _planted()
    st = A.accumulate(_batches(pos, neg, (4, 4, 1)))
    rp, rn, mm = _hand_stats(pos, neg)
    assert st.n == 9
    assert st.r_pos.tolist() == rp
    assert st.r_neg.tolist() == rn
    assert st.scores.tolist() == [[max(a, b) for a, b in zip(x, y)] for x, y in zip(rp, rn)]
    assert torch.allclose(st.mean_m, torch.tensor(mm, dtype=torch.float64), atol=1e-12)
    # some m == 0 ties were planted: r_pos + r_neg < 1 somewhere
    assert bool(((st.r_pos + st.r_neg) < 1).any())
    # batching does not matter
    st2 = A.accumulate(_batches(pos, neg, (1,) * 9))
    assert torch.equal(st.pos_count, st2.pos_count) and torch.equal(st.neg_count, st2.neg_count)


def test_gamma_units_and_plan_match_hand_computation():
    pos, neg = _planted(seed=1)
    loc = _loc_from(pos, neg)
    k, alpha = 5, 10.0
    plan = A.austeer_plan(loc, k, alpha)
    rp, rn, _ = _hand_stats(pos, neg)
    L, W = len(rp), len(rp[0])
    ranked = sorted(((max(rp[l][i], rn[l][i]), l, i) for l in range(L) for i in range(W)),
                    key=lambda t: (-t[0], t[1], t[2]))[:k]
    want = {}
    for s, l, i in ranked:
        g = alpha * rp[l][i] if rp[l][i] > rn[l][i] else -alpha * rn[l][i]
        want[(l, i)] = (s, g)
    units = plan.metadata["units"]
    assert [(u["layer"], u["dim"]) for u in units] == [(l, i) for _, l, i in ranked]
    for u in units:
        s, g = want[(u["layer"], u["dim"])]
        assert u["score"] == pytest.approx(s) and u["gamma"] == pytest.approx(g)
    got = {}
    for e in plan.entries:
        assert e.site == "attn.o_proj.in" and e.b is None
        for d, a in zip(e.dims.tolist(), e.a.tolist()):
            got[(e.layer, d)] = a
    assert set(got) == set(want)
    for key, (s, g) in want.items():
        assert got[key] == pytest.approx(1 + g, abs=1e-6)
    md = plan.metadata
    assert (md["k"], md["alpha"], md["site"], md["n_pairs"], md["data"]["dataset"]) == (k, alpha, "attn.o_proj.in",
                                                                                         9, "planted")
    # the ties rule: r_pos == r_neg takes the negative branch (paper: "otherwise")
    g = A.austeer_gammas(torch.tensor([0.4, 0.7, 0.2]), torch.tensor([0.4, 0.2, 0.7]), 2.0)
    assert g.tolist() == pytest.approx([-0.8, 1.4, -1.4])


def test_topk_is_global_across_layers():
    # N = 10 pairs, 3 layers x 4 dims. Layer 2 dims 1, 3 and layer 1 dim 0 are the most consistent;
    # layer 0 is the weakest everywhere, so a per-layer top-k would wrongly pick from it.
    N, L, W = 10, 3, 4
    consistent = {(0, 0): 6, (0, 1): 6, (0, 2): 6, (0, 3): 6, (1, 0): 9, (1, 1): 5, (1, 2): 5, (1, 3): 7,
                  (2, 0): 5, (2, 1): 10, (2, 2): 5, (2, 3): 8}
    pos = torch.zeros(N, L, W)
    neg = torch.zeros(N, L, W)
    for (l, i), c in consistent.items():
        sign = -1.0 if (l + i) % 2 else 1.0  # some units suppress
        pos[:c, l, i] = sign
        pos[c:, l, i] = -sign
    loc = _loc_from(pos, neg, (3, 7), ModelSpec("llama", 3, 4, 4, 4))
    plan = A.austeer_plan(loc, 3, 1.0)
    chosen = [(u["layer"], u["dim"]) for u in plan.metadata["units"]]
    assert chosen == [(2, 1), (1, 0), (2, 3)]
    per_layer_top1 = [(l, max(range(W), key=lambda i: consistent[(l, i)])) for l in range(L)]
    assert set(chosen) != set(per_layer_top1) and 0 not in {l for l, _ in chosen}
    assert sorted(e.layer for e in plan.entries) == [1, 2]
    assert plan.metadata["units"][0]["gamma"] == pytest.approx(-1.0)  # (2, 1): odd -> suppressing, r_neg = 1


def test_ties_are_deterministic():
    pos = torch.ones(4, 3, 5)
    neg = torch.zeros(4, 3, 5)
    loc = _loc_from(pos, neg, (4,), ModelSpec("llama", 3, 5, 5, 5))
    li, d = A.select_units(loc, 7)
    assert list(zip(li.tolist(), d.tolist())) == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1)]


def test_bad_inputs_raise_clear_errors():
    st = A.MomentumStats()
    with pytest.raises(A.AUSteerError, match="no pairs"):
        st.r_pos
    with pytest.raises(A.AUSteerError, match=r"\[b, L, W\]"):
        st.update(torch.zeros(2, 3), torch.zeros(2, 3))
    st.update(torch.zeros(1, 2, 3), torch.ones(1, 2, 3))
    with pytest.raises(A.AUSteerError, match="earlier batches"):
        st.update(torch.zeros(1, 2, 4), torch.ones(1, 2, 4))
    with pytest.raises(A.AUSteerError, match="NaN"):
        st.update(torch.full((1, 2, 3), float("nan")), torch.ones(1, 2, 3))
    loc = A.Localization(st, "mlp.out", ModelSpec("llama", 2, 3, 3, 3))
    with pytest.raises(A.AUSteerError, match=r"k must be an integer in \[1, 6\]"):
        A.austeer_plan(loc, 7, 1.0)
    with pytest.raises(A.AUSteerError, match="alpha"):
        A.austeer_plan(loc, 2, float("inf"))
    with pytest.raises(A.AUSteerError, match="unknown site"):
        A.resolve_site("attn")


# --------------------------------------------------------------------------------------------
# pairs
# --------------------------------------------------------------------------------------------
def test_pairs_from_yesno_and_mc(yn, mc, tmp_path):
    ps = P.make_pairs(yn[:10])
    for r, p in zip(yn, ps):
        assert p.prompt == tasks.format_prompt(r)
        assert p.positive == f" {r['answer']}" and p.negative == (" No" if r["answer"] == "Yes" else " Yes")
    m1 = P.make_pairs(mc, seed=3)
    m2 = P.make_pairs(list(reversed(mc)), seed=3)
    assert {p.id: p for p in m1} == {p.id: p for p in m2}  # per-record draw, order-independent
    for r, p in zip(mc, m1):
        ch = tasks.choice_texts(r)
        assert p.positive == ch[r["answer_index"]] and p.negative in ch and p.negative != p.positive
    assert any(a.negative != b.negative for a, b in zip(m1, P.make_pairs(mc, seed=4)))
    allp = P.make_pairs(mc[:3], negatives="all")
    assert len(allp) == sum(len(r["choices"]) - 1 for r in mc[:3])
    assert len(P.make_pairs(mc, negatives="all", limit=5)) == 5
    f = tmp_path / "pairs.jsonl"
    P.save_pairs(ps, f)
    assert P.load_pairs(f) == ps
    f.write_text('{"prompt": "Q", "positive": " a", "negative": " a"}\n')
    with pytest.raises(P.PairsError, match="line 1: positive and negative are the same"):
        P.load_pairs(f)
    f.write_text('{"prompt": "Q", "positive": " a"}\n')
    with pytest.raises(P.PairsError, match="'negative'"):
        P.load_pairs(f)
    with pytest.raises(P.PairsError, match="open-ended"):
        P.make_pairs([{"question": "q?", "answers": ["x"]}])


# --------------------------------------------------------------------------------------------
# capture on a tiny model
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("site", ["head", "ffn", "down"])
def test_pair_activations_equal_unbatched_capture(model, tok, yn_pairs, site):
    prs = yn_pairs[:5]
    got = list(A.pair_activations(model, tok, prs, site, batch_size=3))
    pos = torch.cat([g[0] for g in got])
    neg = torch.cat([g[1] for g in got])
    full = A.resolve_site(site)
    for j, p in enumerate(prs):
        for text_ids, ref in zip(P.pair_token_ids(tok, p), (pos[j], neg[j])):
            with site_recorder(model, full) as store, torch.no_grad():
                model(input_ids=torch.tensor([text_ids]))
                want = torch.stack([store[l][0, -1] for l in sorted(store)])
            assert torch.allclose(ref, want, atol=1e-5, rtol=1e-4)


def test_localize_equals_hand_stats_on_model(model, tok, yn_pairs, head_loc):
    batches = list(A.pair_activations(model, tok, yn_pairs, "head", batch_size=24))
    rp, rn, mm = _hand_stats(batches[0][0], batches[0][1])
    assert head_loc.stats.n == len(yn_pairs)
    assert head_loc.stats.r_pos.tolist() == rp and head_loc.stats.r_neg.tolist() == rn
    assert head_loc.provenance["n_pairs"] == len(yn_pairs)


@pytest.mark.parametrize("site", ["head", "ffn", "down"])
def test_plan_applies_gain_exactly_on_chosen_dims(model, tok, yn_pairs, site):
    loc = A.localize(model, tok, yn_pairs[:12], site, batch_size=6)
    plan = A.austeer_plan(loc, 9, 3.0)
    full = A.resolve_site(site)
    ids = torch.tensor([P.pair_token_ids(tok, yn_pairs[0])[0]])
    with torch.no_grad(), attach(model, plan, backend="reference"), site_recorder(model, full) as after, \
            site_recorder(model, full, before_maps=True) as before:
        model(input_ids=ids)
    gains = {}
    for u in plan.metadata["units"]:
        gains[(u["layer"], u["dim"])] = 1.0 + u["gamma"]
    width = loc.spec.site_width(full)
    for l in range(loc.spec.num_layers):
        a = torch.ones(width)
        for (ll, d), g in gains.items():
            if ll == l:
                a[d] = g
        assert torch.equal(after[l], a * before[l]), f"layer {l}"
        changed = (after[l] != before[l]).any(dim=(0, 1)).nonzero().reshape(-1).tolist()
        assert set(changed) <= {d for (ll, d) in gains if ll == l}
    assert any((after[l] != before[l]).any() for l in after)


# --------------------------------------------------------------------------------------------
# baselines and ablations
# --------------------------------------------------------------------------------------------
def test_ablation_plans_are_what_they_claim():
    pos, neg = _planted(n=12, seed=5)
    loc = _loc_from(pos, neg, (5, 7))
    rp, rn, mm = _hand_stats(pos, neg)
    k, alpha = 4, 3.0
    L, W = 3, 6

    def units(plan):
        return [(u["layer"], u["dim"]) for u in plan.metadata["units"]]

    def dense(plan, what):
        out = {}
        for e in plan.entries:
            v = getattr(e, what)
            for d, x in zip(e.dims.tolist(), v.tolist()):
                out[(e.layer, d)] = x
        return out

    base = A.austeer_plan(loc, k, alpha)
    # random localization: the seeded draw, the same gamma rule
    r1 = B.random_localization_plan(loc, k, alpha, seed=7)
    flat = torch.randperm(L * W, generator=torch.Generator().manual_seed(7))[:k].sort().values.tolist()
    assert units(r1) == [(f // W, f % W) for f in flat]
    for (l, i), a in dense(r1, "a").items():
        g = alpha * rp[l][i] if rp[l][i] > rn[l][i] else -alpha * rn[l][i]
        assert a == pytest.approx(1 + g, abs=1e-6)
    assert units(B.random_localization_plan(loc, k, alpha, seed=8)) != units(r1)
    # activation difference: top-k by |mean m|
    ad = B.actdiff_plan(loc, k, alpha)
    want = sorted(((abs(mm[l][i]), l, i) for l in range(L) for i in range(W)), key=lambda t: (-t[0], t[1], t[2]))[:k]
    assert units(ad) == [(l, i) for _, l, i in want]
    # fixed vector: AUSteer's units, b = alpha * mean m, no gains
    fv = B.fixed_vector_plan(loc, k, alpha)
    assert units(fv) == units(base) and all(e.a is None for e in fv.entries)
    for (l, i), b in dense(fv, "b").items():
        assert b == pytest.approx(alpha * mm[l][i], abs=1e-6)
    # fixed strength: a = 1 +/- alpha
    fs = B.fixed_strength_plan(loc, k, alpha)
    assert units(fs) == units(base)
    for (l, i), a in dense(fs, "a").items():
        assert a == pytest.approx(1 + (alpha if rp[l][i] > rn[l][i] else -alpha))
    assert {p.metadata["localization"] + "/" + p.metadata["steering"] for p in (r1, ad, fv, fs)} == {
        "random/adaptive", "actdiff/adaptive", "momentum/fixed_vector", "momentum/fixed_strength"}


def test_head_stats_and_iti_plan_match_hand_computation():
    g = torch.Generator().manual_seed(2)
    n, L, H, d = 7, 2, 3, 4
    pos = torch.randn(n, L, H * d, generator=g)
    neg = torch.randn(n, L, H * d, generator=g)
    pos[:, 1, d:2 * d] += 3.0  # layer 1 head 1 separates consistently
    hs = B.HeadStats(H)
    for s in range(0, n, 3):
        hs.update(pos[s:s + 3], neg[s:s + 3])
    P_ = pos.double().reshape(n, L, H, d)
    N_ = neg.double().reshape(n, L, H, d)
    for l in range(L):
        for h in range(H):
            m = P_[:, l, h] - N_[:, l, h]
            mean = m.mean(0)
            sep = float(mean @ mean) / float((m * m).sum(1).mean())
            assert float(hs.separation[l, h]) == pytest.approx(sep, rel=1e-9)
            th = mean / mean.norm()
            x = torch.cat([P_[:, l, h], N_[:, l, h]])
            proj = x @ th
            sigma = float(((proj - proj.mean()) ** 2).mean().sqrt())
            assert float(hs.sigma[l, h]) == pytest.approx(sigma, rel=1e-6)
    assert hs.top_heads(1) == [(1, 1)]
    spec = ModelSpec("llama", L, H * d, 8, H * d)
    plan = B.iti_plan(hs, spec, 2, 5.0)
    heads = hs.top_heads(2)
    for e in plan.entries:
        assert e.site == "attn.o_proj.in" and e.a is None
    for layer, h in heads:
        e = next(e for e in plan.entries if e.layer == layer)
        pos_in = e.dims.tolist().index(h * d)
        b = e.b[pos_in:pos_in + d]
        want = 5.0 * hs.sigma[layer, h] * hs.direction[layer, h]
        assert torch.allclose(b.double(), want, atol=1e-5)
        assert e.dims[pos_in:pos_in + d].tolist() == list(range(h * d, (h + 1) * d))
    assert sum(e.dims.numel() for e in plan.entries) == 2 * d


def test_iti_on_model_and_caa_plan(model, tok, yn_pairs, head_loc):
    plan = B.iti_plan(head_loc.extra["iti"], head_loc.spec, 3, 2.0)
    assert len(plan.metadata["heads"]) == 3
    vec = B.caa_vectors(model, tok, yn_pairs[:8])
    assert vec.shape == (3, 64)
    # one shared pass over several sites gives the same statistics as separate passes, and the layer.out
    # mean momentum is the CAA vector
    many = A.localize_many(model, tok, yn_pairs[:8], ["head", "layer.out"], batch_size=3)
    one = A.localize(model, tok, yn_pairs[:8], "head", batch_size=8)
    assert torch.equal(many["attn.o_proj.in"].stats.pos_count, one.stats.pos_count)
    assert torch.allclose(many["layer.out"].stats.mean_m.float(), vec, atol=1e-4)
    cp = B.caa_layer_plan(head_loc.spec, 1, vec[1], 2.0)
    ids = torch.tensor([P.pair_token_ids(tok, yn_pairs[0])[0]])
    with torch.no_grad(), attach(model, cp, backend="reference"), site_recorder(model, "layer.out") as after, \
            site_recorder(model, "layer.out", before_maps=True) as before:
        model(input_ids=ids)
    assert torch.equal(after[1], before[1] + 2.0 * vec[1])
    assert torch.equal(after[0], before[0])


# --------------------------------------------------------------------------------------------
# sweep
# --------------------------------------------------------------------------------------------
def test_sweep_matches_fresh_attach_per_cell(model, tok, yn, head_loc, tmp_path):
    val = yn[28:36]
    fn = lambda k, a: A.austeer_plan(head_loc, k, a)  # noqa: E731
    res = SW.sweep(model, tok, val, [3, 40], [0.5, 20.0], fn, backend="torch")
    for i, k in enumerate([3, 40]):
        for j, a in enumerate([0.5, 20.0]):
            with attach(model, fn(k, a), backend="reference"):
                r = tasks.evaluate(model, tok, val, progress=False)
            assert res.correct[i][j] == r.correct
    van = tasks.evaluate(model, tok, val, progress=False)
    assert res.vanilla_correct == van.correct
    best = res.best
    assert best["accuracy"] == max(max(r) for r in res.accuracy)
    paths = res.write(tmp_path / "sw")
    data = json.loads(open(paths["json"]).read())
    assert data["rows"] == [3, 40] and data["best"] == best
    assert "| 3 |" in open(paths["md"]).read()
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_sweep_best_prefers_fewer_units_on_ties():
    r = SW.SweepResult("m", "k", "alpha", [5, 10], [1, 2], [[0.5, 0.7], [0.7, 0.7]], [[1, 1], [1, 1]], 10)
    assert (r.best["k"], r.best["alpha"]) == (5, 2)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("tiny_model")
    tiny("llama", seed=1).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_cli_build_eval_sweep(model_dir, tmp_path, capsys):
    plan_f = tmp_path / "plan.safetensors"
    rc = cli.main(["austeer", "build", "--model", str(model_dir), "--dataset", "strategyqa", "--site", "ffn",
                   "--pairs", "12", "--offset", "20", "--k", "5", "--alpha", "2", "-o", str(plan_f), "--quiet"])
    assert rc == 0
    plan = SteeringPlan.load(plan_f)
    md = plan.metadata
    assert (md["k"], md["alpha"], md["site"], md["n_pairs"]) == (5, 2.0, "mlp.out", 12)
    assert md["data"]["dataset"] == "strategyqa" and md["data"]["first_record"] == 20
    assert len(md["units"]) == 5 and sum(e.dims.numel() for e in plan.entries) == 5
    assert "top 5 of 5 units" in capsys.readouterr().out

    out_j = tmp_path / "eval.json"
    rc = cli.main(["eval", "--model", str(model_dir), "--plan", str(plan_f), "--dataset", "strategyqa",
                   "--limit", "6", "--backend", "torch", "--json", str(out_j), "--quiet"])
    assert rc == 0
    res = json.loads(out_j.read_text())
    assert res["n"] == 6 and 0 <= res["accuracy"] <= 1 and res["ci_low"] <= res["accuracy"] <= res["ci_high"]
    assert res["plan_metadata"]["k"] == 5
    assert "| strategyqa |" in capsys.readouterr().out

    rc = cli.main(["austeer", "sweep", "--model", str(model_dir), "--dataset", "strategyqa", "--val", "6",
                   "--pairs", "10", "--k", "2", "4", "--alpha", "1", "5", "--out", str(tmp_path / "sw"),
                   "--save-best", "--quiet"])
    assert rc == 0
    data = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert data["rows"] == [2, 4] and data["cols"] == [1.0, 5.0] and data["n"] == 6
    assert data["info"]["pairs"]["first_record"] == 6
    assert (tmp_path / "sw" / "heatmap.png").is_file() and (tmp_path / "sw" / "results.md").is_file()
    assert SteeringPlan.load(tmp_path / "sw" / "best_plan.safetensors").metadata["k"] == data["best"]["k"]


def test_cli_errors_are_clear(model_dir, tmp_path, capsys):
    rc = cli.main(["austeer", "build", "--model", str(model_dir), "--dataset", "strategyqa", "--pairs", "4",
                   "--k", "0", "-o", str(tmp_path / "p.safetensors"), "--quiet"])
    assert rc == 2 and "--k must be a positive integer" in capsys.readouterr().err
    rc = cli.main(["eval", "--model", str(model_dir), "--dataset", str(tmp_path / "nope.jsonl"), "--quiet"])
    assert rc == 2 and "unknown dataset" in capsys.readouterr().err
    rc = cli.main(["austeer", "build", "--model", str(model_dir), "--dataset", "strategyqa", "--pairs", "4",
                   "--k", "100000", "-o", str(tmp_path / "p.safetensors"), "--quiet"])
    assert rc == 2 and "exceeds" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["caa", "iti", "random", "actdiff", "fixed_vector", "fixed_strength"])
def test_cli_baseline_build_matches_python_api(model_dir, tmp_path, capsys, method):
    """`fusesteer baseline build` writes the plan the Python API builds from the same pairs."""
    from fusesteer.evaluate.tasks import load_dataset
    from fusesteer.methods import baselines as B
    from fusesteer.methods.pairs import make_pairs
    from fusesteer.models import load

    out = tmp_path / f"{method}.safetensors"
    rc = cli.main(["baseline", "build", "--method", method, "--model", str(model_dir), "--dataset", "strategyqa",
                   "--pairs", "10", "--site", "ffn", "--layer", "1", "--scale", "3", "--heads", "2", "--k", "4",
                   "--alpha", "2", "-o", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    got = SteeringPlan.load(out)
    model, tk = load(str(model_dir))
    prs = make_pairs(load_dataset("strategyqa")[60:], negatives="random", seed=0, limit=10)  # after --val 60
    if method == "caa":
        want = B.caa_layer_plan(got.spec, 1, B.caa_vectors(model, tk, prs)[1], 3.0)
    elif method == "iti":
        loc = A.localize(model, tk, prs, "head", extra={"iti": B.HeadStats(model.config.num_attention_heads)})
        want = B.iti_plan(loc.extra["iti"], got.spec, 2, 2.0)
    else:
        want = B.ABLATIONS[method](A.localize(model, tk, prs, "ffn"), 4, 2.0)
    assert len(got.entries) == len(want.entries) > 0
    for e, w in zip(got.entries, want.entries):
        assert (e.layer, e.site) == (w.layer, w.site)
        for x, y in ((e.a, w.a), (e.b, w.b), (e.dims, w.dims)):
            assert (x is None) == (y is None)
            if x is not None:
                assert torch.allclose(torch.as_tensor(x).float(), torch.as_tensor(y).float(), atol=1e-5)


def test_cli_baseline_sweep(model_dir, tmp_path, capsys):
    rc = cli.main(["baseline", "sweep", "--method", "caa", "--model", str(model_dir), "--dataset", "strategyqa",
                   "--val", "6", "--pairs", "8", "--layer", "0", "1", "--scale", "1", "4", "--out",
                   str(tmp_path / "caa"), "--save-best", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "caa" / "results.json").read_text())
    assert data["rows"] == [0, 1] and data["cols"] == [1.0, 4.0] and data["row_name"] == "layer"
    assert SteeringPlan.load(tmp_path / "caa" / "best_plan.safetensors").metadata["method"] == "caa"
    rc = cli.main(["baseline", "build", "--method", "caa", "--model", str(model_dir), "--dataset", "strategyqa",
                   "--pairs", "4", "--layer", "99", "-o", str(tmp_path / "x.safetensors"), "--quiet"])
    assert rc == 2 and "out of range" in capsys.readouterr().err
