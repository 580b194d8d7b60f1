"""The server's admission policy (``serve/scheduler.py``), KV slots and masks (``serve/kv.py``) and the prefix
cache (``serve/prefix.py``), with no model and no server: FIFO, the row limit, the prefill token cap, plan-slot
back-pressure, the queue limit."""

from __future__ import annotations

import torch

from fusesteer.serve.requests import GenRequest, Status
from fusesteer.serve.scheduler import Admission, Limits, Waiting, admit, queue_has_room, retry_after

LIM = Limits(max_batch=4, max_prefill_tokens=100, plan_slots=2)


def W(n=10, plan=None, cancelled=False):
    return Waiting(n, plan, cancelled)


def test_fifo_until_the_rows_are_full():
    q = [W(), W(), W(), W(), W(), W()]
    assert admit(q, 0, (), LIM) == Admission(take=(0, 1, 2, 3))
    assert admit(q, 3, (), LIM).take == (0,)
    assert admit(q, 4, (), LIM) == Admission()
    assert admit([], 0, (), LIM) == Admission()


def test_prefill_cap_pads_to_the_longest_and_never_lets_a_short_prompt_overtake():
    # 3 * 30 = 90 fits; a fourth at 30 is 120
    assert admit([W(30), W(30), W(30), W(30)], 0, (), LIM).take == (0, 1, 2)
    # the long one ends the walk: the short one behind it waits too (FIFO)
    assert admit([W(10), W(60), W(5)], 0, (), LIM).take == (0,)
    # padding counts: 10 then 50 -> 2 * 50 = 100 fits, then 3 * 50 does not
    assert admit([W(10), W(50), W(1)], 0, (), LIM).take == (0, 1)


def test_a_prompt_over_the_cap_still_runs_alone():
    assert admit([W(500), W(1)], 0, (), LIM).take == (0,)
    assert admit([W(500)], 3, (), LIM).take == (0,)


def test_plan_slot_back_pressure_keeps_the_place_and_lets_others_pass():
    # two plans run already (the table's two slots): a third plan waits, unsteered and in-use plans go
    q = [W(plan="c"), W(), W(plan="a"), W(plan="c")]
    adm = admit(q, 2, {"a", "b"}, Limits(max_batch=8, max_prefill_tokens=100, plan_slots=2))
    assert adm.take == (1, 2) and adm.deferred == (0, 3) and adm.drop == ()
    # one slot free: the first new plan takes it, its second request shares it, the next new plan waits
    adm = admit([W(plan="x"), W(plan="y"), W(plan="x")], 0, {"a"}, LIM)
    assert adm.take == (0, 2) and adm.deferred == (1,)


def test_a_deferred_request_takes_neither_a_row_nor_prefill_tokens():
    lim = Limits(max_batch=2, max_prefill_tokens=20, plan_slots=1)
    adm = admit([W(10, plan="a"), W(100, plan="b"), W(10), W(10)], 0, (), lim)
    assert adm.take == (0, 2) and adm.deferred == (1,)


def test_cancelled_requests_are_dropped_on_the_walk():
    adm = admit([W(cancelled=True), W(), W(cancelled=True), W()], 0, (), LIM)
    assert adm.take == (1, 3) and adm.drop == (0, 2)
    # the walk stops at the row limit: a cancelled request past it stays for the engine's own sweep
    adm = admit([W(), W(cancelled=True)], 3, (), LIM)
    assert adm.take == (0,) and adm.drop == ()


def test_admit_invariants_on_random_queues():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        n = int(torch.randint(0, 12, (1,), generator=g))
        plans = [None, "a", "b", "c", "d"]
        q = [W(int(torch.randint(1, 80, (1,), generator=g)), plans[int(torch.randint(0, 5, (1,), generator=g))],
               bool(torch.rand(1, generator=g) < 0.15)) for _ in range(n)]
        running = int(torch.randint(0, 5, (1,), generator=g))
        in_use = {"a"} if running else set()
        lim = Limits(int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 200, (1,), generator=g)),
                     int(torch.randint(1, 4, (1,), generator=g)))
        adm = admit(q, running, in_use, lim)
        assert list(adm.take) == sorted(adm.take) and not set(adm.take) & (set(adm.drop) | set(adm.deferred))
        assert running + len(adm.take) <= max(lim.max_batch, running)
        assert all(not q[i].cancelled for i in adm.take) and all(q[i].cancelled for i in adm.drop)
        if len(adm.take) > 1:
            assert len(adm.take) * max(q[i].prompt_len for i in adm.take) <= lim.max_prefill_tokens
        used = in_use | {q[i].plan for i in adm.take if q[i].plan is not None}
        assert len(used) <= max(lim.plan_slots, len(in_use))
        for i in adm.deferred:
            assert q[i].plan is not None and q[i].plan not in used


def test_queue_limit_counts_only_requests_no_free_row_takes():
    assert queue_has_room(queued=0, busy_rows=0, max_batch=1, max_queue=0)
    assert not queue_has_room(queued=0, busy_rows=1, max_batch=1, max_queue=0)
    assert queue_has_room(queued=2, busy_rows=2, max_batch=4, max_queue=1)
    assert not queue_has_room(queued=3, busy_rows=2, max_batch=4, max_queue=1)
    assert not queue_has_room(queued=1, busy_rows=9, max_batch=4, max_queue=1)


def test_retry_after_is_16_steps_clamped():
    assert retry_after(0.001) == 1.0 and retry_after(0.25) == 4.0 and retry_after(100.0) == 60.0


def test_request_status_and_cancel():
    req = GenRequest(prompt_ids=[1], max_tokens=1, sink=lambda ev: None)
    assert req.status is Status.NEW and not req.cancelled and not req.done
    req.cancel("stop")
    assert req.cancelled and req.cancel_reason == "stop"
    req.status = Status.FINISHED
    assert req.done


# ---- KV slots, masks and the prefix cache -----------------------------------------------------------------


def test_slot_cache_writes_per_row_columns_and_moves_slots():
    from fusesteer.serve.kv import SlotCache

    c = SlotCache(rows=3, max_len=6, n_layers=1)
    k = torch.arange(2 * 2 * 1 * 2, dtype=torch.float32).view(2, 2, 1, 2) + 1  # [batch, heads, q, dim]
    c.write, c.span, c.slots = torch.tensor([[4], [c.scratch]]), torch.zeros(2, 1, 1, 5, dtype=torch.bool), None
    kk, vv = c.update(k, -k, 0)
    assert kk.shape == (2, 2, 5, 2) and c.key_cache[0].shape == (3, 2, 7, 2)
    assert torch.equal(c.key_cache[0][0, :, 4], k[0, :, 0]) and torch.equal(c.value_cache[0][1, :, 6], -k[1, :, 0])
    assert not c.key_cache[0][1, :, :6].any()  # an idle row writes its scratch column only
    c.slots = torch.tensor([2])  # a gathered (prefill) forward into slot 2
    c.write = torch.tensor([[0]])
    c.update(k[:1], -k[:1], 0)
    assert torch.equal(c.key_cache[0][2, :, 0], k[0, :, 0])
    c.copy(0, 1, 5)
    assert torch.equal(c.key_cache[0][1, :, :5], c.key_cache[0][0, :, :5])
    c.zero(0)
    assert not c.key_cache[0][0].any() and not c.value_cache[0][0].any()


def test_attention_masks_per_row_and_window():
    from fusesteer.serve.kv import attention_mask

    m = attention_mask(torch.tensor([[2], [0]]), 4, {"full_attention": None}, "sdpa", torch.float32)
    assert m.shape == (2, 1, 1, 4) and m[:, 0, 0].tolist() == [[True, True, True, False], [True, False, False, False]]
    d = attention_mask(torch.tensor([[1, 3]]), 4, {"full_attention": None, "sliding_attention": 2}, "eager",
                       torch.float32)
    assert (d["sliding_attention"][0, 0] == 0).tolist() == [[True, True, False, False], [False, False, True, True]]
    assert (d["full_attention"][0, 0] == 0).tolist() == [[True, True, False, False], [True, True, True, True]]


def test_prefix_cache_shares_only_with_the_same_prompt_steering():
    import fusesteer as fs
    from fusesteer.serve.prefix import PrefixCache, prompt_key

    model = fs.testing.tiny("llama")
    plan = fs.SteeringPlan.for_model(model)
    w = model.config.hidden_size
    plan.add(layer=0, site="layer.out", b=torch.ones(w), gating="generated")
    assert prompt_key("gen#1@1.0", plan) is None  # generated-only: shares the unsteered prompt KV
    plan.add(layer=1, site="layer.out", b=torch.ones(w), gating="prompt")
    assert prompt_key("gen#1@1.0", plan) == "gen#1@1.0"
    assert prompt_key(None, None) is None and prompt_key("a", None) == "a"
    p = PrefixCache(4)
    p.offer(2, [1, 2, 3, 4, 5], "a")
    p.offer(3, [1, 2, 3], None)
    assert p.lookup([1, 2, 3, 4, 5, 6], "b") == (-1, 0)  # another plan's prompt KV is never reused
    assert p.lookup([1, 2, 3, 4, 5, 6], "a") == (2, 5)
    assert p.lookup([1, 2, 3, 4, 5], "a") == (2, 4)  # the last prompt token is always recomputed
    assert p.lookup([1, 2, 9, 7], None, live=[(0, [1, 2, 9, 9], None)]) == (0, 3)
    # a new row takes slot 2: its prefix moves to the highest free slot without one (3 holds one: 1 is left)
    assert p.move_out(2, [1, 2, 3]) == (1, 5)
    assert p.lookup([1, 2, 3, 4, 5, 6], "a") == (1, 5)
    assert p.move_out(2, [1, 2, 3]) is None  # nothing cached in 2 any more
    assert p.move_out(3, [3]) is None and p.lookup([1, 2, 3, 4], None) == (-1, 0)  # no room: dropped
    p.forget(1)
    assert p.lookup([1, 2, 3, 4, 5, 6], "a") == (-1, 0)


def test_transposed_linears_are_the_same_products_within_their_rows_and_can_be_undone():
    import fusesteer as fs
    from fusesteer.serve.forward import transposed_linears

    model = fs.testing.tiny("llama")
    head, q = model.get_output_embeddings(), model.model.layers[0].self_attn.q_proj
    mods = [m for m in model.modules() if type(m) is torch.nn.Linear]
    x = torch.randn(3, 2, model.config.hidden_size)
    want, want1 = head(x), head(x[:1, :1])
    assert transposed_linears(model, margin=0.0) is None and not any("forward" in vars(m) for m in mods)  # never
    mine = q.forward
    vars(q)["forward"] = mine  # a module whose forward is already replaced (e.g. a steering patch) is left alone
    undo = transposed_linears(model, sizes=(2, 6), margin=float("inf"))  # always "faster": installed
    assert undo is not None and all("forward" in vars(m) for m in mods)
    assert vars(q)["forward"] is mine
    got = head(x)  # 6 rows, a timed count: W @ x^T
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(head(x[:1, :1]), want1)  # one row, and counts that were not timed: F.linear itself
    for rows in (4, 10):
        other = torch.randn(rows, 1, model.config.hidden_size)
        assert torch.equal(head(other), torch.nn.functional.linear(other, head.weight))
    assert transposed_linears(model, margin=float("inf")) is None  # already installed: not stacked
    head.bias = torch.nn.Parameter(torch.ones(head.out_features))  # a bias set afterwards is not dropped
    torch.testing.assert_close(head(x), want + 1, rtol=1e-5, atol=1e-5)
    head.bias = None
    undo()
    assert vars(q)["forward"] is mine and all("forward" not in vars(m) for m in mods if m is not q)
    assert torch.equal(head(x), want)


def test_grouped_decode_attention_equals_sdpa_with_repeated_heads():
    from transformers.integrations.sdpa_attention import repeat_kv

    from fusesteer.serve.kv import attention_mask, grouped_decode_attention
    from fusesteer.tolerances import FP32_ABS

    g = torch.Generator().manual_seed(0)
    for b, h, kv, n, window, kind in ((3, 9, 3, 7, None, "sdpa"), (2, 4, 4, 5, None, "eager"), (4, 8, 2, 9, 3, "sdpa")):
        q, k, v = (torch.randn(b, x, t, 16, generator=g) for x, t in ((h, 1), (kv, n), (kv, n)))
        pos = torch.randint(0, n, (b, 1), generator=g)
        mask = attention_mask(pos, n, {"full_attention": window}, kind, torch.float32)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, repeat_kv(k, h // kv), repeat_kv(v, h // kv), attn_mask=mask, scale=0.3).transpose(1, 2)
        got = grouped_decode_attention(q, k, v, mask, 0.3)
        assert got.shape == (b, 1, h, 16)
        torch.testing.assert_close(got, ref, rtol=0, atol=FP32_ABS)
        col = int(pos[0, 0]) + 1  # a column past row 0's position never reaches it
        k2, v2 = k.clone(), v.clone()
        if col < n:
            k2[0, :, col], v2[0, :, col] = 1e4, 1e4
            assert torch.equal(grouped_decode_attention(q, k2, v2, mask, 0.3)[0], got[0])


def test_decode_attention_serves_one_token_queries_and_hands_the_rest_to_sdpa():
    from transformers import DynamicCache

    import fusesteer as fs
    from fusesteer.runtime.compat import with_cache
    from fusesteer.serve.kv import DECODE_ATTENTION, attention_mask, decode_attention, mask_kind
    from fusesteer.tolerances import FP32_ABS

    model = fs.testing.tiny("llama")
    model.set_attn_implementation("sdpa")
    assert model.config.num_attention_heads > model.config.num_key_value_heads  # grouped query heads
    ids = torch.randint(3, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        undo = decode_attention(model)
        assert undo is not None and model.config._attn_implementation == DECODE_ATTENTION
        assert mask_kind(model) == "sdpa" and decode_attention(model) is None  # a second engine: sdpa masks, no stack
        got = model(input_ids=ids).logits  # a 6-token query: sdpa's own path
        assert torch.equal(got, want)
        cache = DynamicCache()
        model(**with_cache(model, cache, input_ids=ids[:, :5], use_cache=True))
        mask = attention_mask(torch.tensor([[5], [5]]), 6, {"full_attention": None}, "sdpa", torch.float32)
        last = model(**with_cache(model, cache, input_ids=ids[:, 5:], attention_mask=mask,  # one token: grouped path
                                  position_ids=torch.tensor([[5], [5]]))).logits
        torch.testing.assert_close(last[:, 0], want[:, 5], rtol=0, atol=FP32_ABS * 10)
        undo()
        assert model.config._attn_implementation == "sdpa"
    # a mask that broadcasts over the batch is not a per-row slot mask: transformers' sdpa handles it
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from fusesteer.serve.kv import _decode_attention_forward
    attn = model.model.layers[0].self_attn
    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 5, 16)
    shared = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    want_b = ALL_ATTENTION_FUNCTIONS["sdpa"](attn, q, k, k, shared, scaling=0.25)[0]
    assert torch.equal(_decode_attention_forward(attn, q, k, k, shared, scaling=0.25)[0], want_b)
    model.set_attn_implementation("eager")
    assert decode_attention(model) is None and model.config._attn_implementation == "eager"  # sdpa models only


def test_eager_decode_pads_to_sizes_with_fast_gemms_and_compiled_to_its_buckets():
    import fusesteer as fs
    from fusesteer.serve.forward import Forwards, padded_sizes
    from fusesteer.serve.steer import Steerer

    assert padded_sizes(32) == (1, 2, 4, 8, 16, 24, 32) and padded_sizes(5) == (1, 2, 4, 5)
    assert padded_sizes(256)[-5:] == (128, 160, 192, 224, 256) and padded_sizes(1) == (1,)
    model = fs.testing.tiny("llama")
    st = Steerer(model, capacity=2)
    try:
        fw = Forwards(model, st, 32, 16, buckets=(1, 8, 32))
        assert [fw.bucket(b) for b in (1, 3, 8, 9, 17, 22, 25, 32)] == [1, 4, 8, 16, 24, 24, 32, 32]
        fw.copts.enabled = True  # compiled: one graph per bucket, nothing else
        assert [fw.bucket(b) for b in (1, 3, 9, 22)] == [1, 8, 32, 32]
    finally:
        st.close()


def test_recompile_count_sees_a_recompilation():
    """The count behind fusesteer_compile_recompiles must move when dynamo compiles a new graph (a counter this
    torch does not keep would read 0 forever)."""
    from fusesteer.serve.forward import recompiles

    f = torch.compile(lambda x: x * 2, backend="eager", dynamic=False, fullgraph=True)
    f(torch.zeros(3))
    r = recompiles()
    f(torch.zeros(3))
    assert recompiles() == r
    f(torch.zeros(5))  # a new static shape: a recompilation
    assert recompiles() == r + 1
