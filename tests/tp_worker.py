"""Run under torchrun (gloo, CPU) by tests/test_tp.py: steering a tensor-parallel model equals the same plans on
one process. Every rank runs the same calls; rank 0 writes what it measured as JSON.

    python -m torch.distributed.run --nproc-per-node 2 tests/tp_worker.py FOLDER OUT.json [--triton]
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before fusesteer imports Triton

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import fusesteer as fs  # noqa: E402
from fusesteer.evaluate import tasks  # noqa: E402
from fusesteer.methods import austeer as A  # noqa: E402
from fusesteer.methods import pairs as P  # noqa: E402
from fusesteer.runtime import tp  # noqa: E402
from fusesteer.runtime.compat import tensor_parallel_kwargs  # noqa: E402
from fusesteer.runtime.families import model_parts  # noqa: E402
from fusesteer.testing import word_tokenizer  # noqa: E402
from fusesteer.tolerances import FP32_ABS  # noqa: E402


def plan_for(model, seed, gating="all", gains_only=False, scale=0.5):
    """Every site each layer has, dense (a, b) (gains only: b = 0, for fold)."""
    parts = model_parts(model)
    g = torch.Generator().manual_seed(seed)
    plan = fs.SteeringPlan.for_model(model)
    for layer in range(len(parts.layers)):
        for site in parts.sites_of(layer):
            if gains_only and site not in ("attn.o_proj.in", "mlp.down_proj.in"):
                continue  # the sites whose gains fold on every family (a sparse MoE layer's mlp.out does not)
            w = plan.spec.site_width(site)
            a = 1 + scale * (torch.rand(w, generator=g) - 0.5)
            b = None if gains_only else scale * torch.randn(w, generator=g)
            plan.add(layer=layer, site=site, a=a, b=b, gating=gating)
    return plan


def batch(vocab, lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):  # left padding
        ids[i, T - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, T - n:] = 1
    return ids, mask


def run(model, backend, plans, rows, ids, mask, plen=None, **kw):
    with fs.attach(model, plans, backend=backend, **kw) as h:
        if len(plans) > 1:
            h.route(rows)
        if plen is not None:
            h.set_prompt_length(plen)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
            toks = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    return logits, toks


def local_state(model):
    return {n: tp.local(p).detach().clone() for n, p in model.named_parameters()}


def main():
    folder, out_path = sys.argv[1], sys.argv[2]
    backends = ["reference", "torch", "auto"] + (["triton"] if "--triton" in sys.argv else [])
    try:  # transformers itself may not shard a model (5.0 cannot load Qwen3-MoE with tp_plan on CPU)
        par = AutoModelForCausalLM.from_pretrained(folder, **tensor_parallel_kwargs("auto")).eval()
    except Exception as e:  # noqa: BLE001 - reported to the test, which skips naming it
        with open(f"{out_path}.load-error.{os.environ.get('RANK', '?')}", "w") as f:
            f.write(f"{type(e).__name__}: {e}")
        sys.exit(0)
    one = AutoModelForCausalLM.from_pretrained(folder).eval()
    dist.barrier()
    rank, world = dist.get_rank(), dist.get_world_size()
    ids0 = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():  # the unsteered tensor-parallel model is the single-process model
        base_d = float((par(ids0).logits - one(ids0).logits).abs().max())
    vocab = one.config.vocab_size
    res = {"world": world, "parallel": tp.is_parallel(par), "unsteered_max_abs": base_d, "checks": {}}
    checks = res["checks"]

    def record(name, got, want, exact_tokens=None):
        d = float((got[0].float() - want[0].float()).abs().max())
        same = bool(torch.equal(got[1], want[1])) if exact_tokens is None else exact_tokens
        checks[name] = {"max_abs": d, "tokens_equal": same, "ok": d <= FP32_ABS and same}

    # 1. per-row plans (prompt / generated gating), unsteered rows, left padding, every backend
    calm, bold = plan_for(one, 1, "prompt"), plan_for(one, 2, "generated")
    ids, mask = batch(vocab, [5, 7, 4])
    rows = ["calm", None, "bold"]
    for backend in backends:
        plans = {"calm": calm, "bold": bold}
        record(f"rows/{backend}", run(par, backend, plans, rows, ids, mask),
               run(one, "reference", plans, rows, ids, mask))
    # explicit prompt lengths
    record("plen/torch", run(par, "torch", {"calm": calm, "bold": bold}, rows, ids, mask, plen=[4, 5, 2]),
           run(one, "reference", {"calm": calm, "bold": bold}, rows, ids, mask, plen=[4, 5, 2]))

    # 2. fold: gains fold into each rank's shard exactly; a bias is refused with a reason
    gains = plan_for(one, 4, gains_only=True)
    before = local_state(par)
    record("fold/gains", run(par, "fold", {"p": gains}, None, ids, mask),
           run(one, "reference", {"p": gains}, None, ids, mask))
    try:
        fs.attach(par, plan_for(one, 5), backend="fold").detach()
        checks["fold/bias refused"] = {"ok": False, "why": "attached"}
    except fs.AttachError as e:
        checks["fold/bias refused"] = {"ok": "tensor parallel" in str(e), "why": str(e)[:300]}
    # 3. detach restores every rank's shard bit-exactly (after fold, auto, torch, triton above)
    after = local_state(par)
    checks["detach/bit-exact"] = {"ok": all(torch.equal(before[n], after[n]) for n in before)}

    # 4. update / route / add_plan / remove_plan on a live handle, the same calls on every rank
    with fs.attach(par, {}, backend="torch", capacity=3, sites="all") as h, \
            fs.attach(one, {}, backend="reference", capacity=3, sites="all") as r:
        for hh in (h, r):
            hh.add_plan("calm", calm)
            hh.add_plan("bold", bold)
            hh.route(["bold", "calm", None])
        with torch.no_grad():
            record("live/add+route", (par(ids, attention_mask=mask).logits, torch.zeros(1)),
                   (one(ids, attention_mask=mask).logits, torch.zeros(1)))
        new = plan_for(one, 6, "generated")
        for hh in (h, r):
            hh.update("calm", new)
            hh.route([None, "bold", "calm"])
        with torch.no_grad():
            record("live/update", (par(ids, attention_mask=mask).logits, torch.zeros(1)),
                   (one(ids, attention_mask=mask).logits, torch.zeros(1)))
        for hh in (h, r):
            hh.route([None, None, "calm"])
            hh.remove_plan("bold")
            hh.add_plan("again", bold)
            hh.route(["again", None, "calm"])
        with torch.no_grad():
            record("live/remove+add", (par(ids, attention_mask=mask).logits, torch.zeros(1)),
                   (one(ids, attention_mask=mask).logits, torch.zeros(1)))

    # 5. a plan held by rank 0 only reaches every rank through the bounded loader
    got = tp.broadcast_plan(calm if rank == 0 else None)
    checks["broadcast_plan"] = {"ok": got.to_bytes() == calm.to_bytes()}

    # 6. AUSteer localization on the TP model picks the same units as on one process (full-width capture)
    recs = tasks.load_dataset("strategyqa", limit=16)
    tok = word_tokenizer([t for r in recs for t in [tasks.format_prompt(r)] + tasks.choice_texts(r)], vocab)
    pairs = P.make_pairs(recs)
    for site in ("head", "ffn"):
        lp, lo = A.localize(par, tok, pairs, site), A.localize(one, tok, pairs, site)
        up, uo = A.select_units(lp, 8), A.select_units(lo, 8)
        checks[f"austeer/{site}"] = {"ok": [u.tolist() for u in up] == [u.tolist() for u in uo],
                                     "units": [u.tolist() for u in up]}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
