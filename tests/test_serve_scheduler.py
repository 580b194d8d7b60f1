"""The server's admission policy (``serve/scheduler.py``) and batch KV surgery (``serve/kv.py``), with no model
and no server: FIFO, the row limit, the prefill token cap, plan-slot back-pressure, the queue limit."""

from __future__ import annotations

import pytest
import torch

from fusesteer.serve.kv import Batch, merge_batches, select_rows, zero_padding
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


# ---- KV batch surgery --------------------------------------------------------------------------------------


def _kv(rows, t, layers=2):
    g = torch.Generator().manual_seed(rows * 100 + t)
    return [(torch.randn(rows, 2, t, 3, generator=g), torch.randn(rows, 2, t, 3, generator=g))
            for _ in range(layers)]


def test_merge_left_pads_the_shorter_batch():
    a, b = _kv(2, 3), _kv(1, 5)
    ma, mb = torch.ones(2, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)
    kv, mask = merge_batches(a, ma, b, mb)
    assert mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    for (k, v), (ka, va), (kb, vb) in zip(kv, a, b):
        assert k.shape == (3, 2, 5, 3)
        assert torch.equal(k[:2, :, 2:], ka) and torch.equal(v[2:], vb) and not k[:2, :, :2].any()
    kv, mask = merge_batches(None, None, b, mb)
    assert kv is b and mask is mb


def test_select_keeps_rows_and_cuts_common_padding():
    kv = _kv(3, 6)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out, m = select_rows(kv, mask, [0, 1], [3, 4])
    assert m.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert torch.equal(out[0][0], kv[0][0][:2, :, 2:])
    out, m = select_rows(kv, mask, [0, 1, 2], [3, 4, 6])
    assert torch.equal(out[1][1], kv[1][1]) and torch.equal(m, mask)
    assert select_rows(kv, mask, [], []) == (None, None)


def test_zero_padding_clears_pad_columns_only():
    kv = [(torch.full((2, 1, 3, 2), float("nan")), torch.ones(2, 1, 3, 2))]
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    out = zero_padding(kv, mask)
    assert out[0][0][0, :, 0].eq(0).all() and out[0][0][0, :, 1:].isnan().all() and out[0][1][0, :, 0].eq(0).all()
    full = torch.ones(2, 3, dtype=torch.long)
    assert zero_padding(kv, full) is kv
    # finite pad entries give x * 0, bit for bit what the multiply-by-mask gave before (a signed zero);
    # +-Inf gives 0 where x * 0 was NaN
    k = torch.tensor([-1.5, 2.0, float("inf"), float("-inf")]).view(4, 1, 1, 1).expand(4, 1, 2, 1).contiguous()
    out = zero_padding([(k, k)], torch.tensor([[0, 1]] * 4))[0][0][:, 0, 0, 0]
    assert out.eq(0).all() and out.signbit().tolist() == [True, False, False, False]


def test_batch_append_and_keep_through_a_real_cache():
    pytest.importorskip("transformers")
    from fusesteer.runtime.compat import cache_from_tensors, cache_tensors

    b = Batch()
    first = _kv(2, 4)
    b.append(cache_from_tensors(first), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), [0, 1], [3, 4])
    second = _kv(1, 2)
    b.append(cache_from_tensors(second), torch.ones(1, 2, dtype=torch.long), [0], [2])
    assert b.mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]]
    k = cache_tensors(b.cache)[0][0]
    assert torch.equal(k[1], first[0][0][1]) and torch.equal(k[2, :, 2:], second[0][0][0])
    assert not k[0, :, 0].any()  # the pad column was zeroed on the way in
    assert b.next_mask().shape == (3, 5)
    b.keep([2], [2])
    assert b.mask.tolist() == [[1, 1]] and torch.equal(cache_tensors(b.cache)[1][1][0], second[1][1][0])
    b.keep([], [])
    assert b.cache is None and b.mask is None
