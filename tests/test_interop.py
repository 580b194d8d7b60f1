"""GGUF control vectors (llama.cpp / repeng convention) and peer imports (steering-vectors, repeng)."""

import math

import gguf
import numpy as np
import pytest
import torch

import fusesteer as fs
from fusesteer.interop.gguf_cv import (
    ControlVectorError,
    control_vector_directions,
    inspect_control_vector,
    read_control_vector,
    read_control_vectors,
    write_control_vector,
)
from fusesteer.interop.peers import from_repeng, from_steering_vector, import_repeng
from fusesteer.testing import FP32_ABS

try:
    import steering_vectors
    SV_IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the environment
    steering_vectors, SV_IMPORT_ERROR = None, e
try:
    repeng = import_repeng()
    REPENG_IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover
    repeng, REPENG_IMPORT_ERROR = None, e

needs_sv = pytest.mark.skipif(SV_IMPORT_ERROR is not None,
                              reason=f"steering-vectors is not installed/importable: {SV_IMPORT_ERROR}")
needs_repeng = pytest.mark.skipif(REPENG_IMPORT_ERROR is not None,
                                  reason=f"repeng is not installed/importable: {REPENG_IMPORT_ERROR}")


# ------------------------------------------------------------------------------------------------
# helpers


def write_raw(path, directions, arch="controlvector", hint="llama", count=None, dtype=np.float32,
              drop=(), extra=None, count_int32=False):
    """An independent writer: the gguf package's GGUFWriter, with knobs to produce bad files."""
    w = gguf.GGUFWriter(str(path), arch)
    if "model_hint" not in drop:
        if isinstance(hint, str):
            w.add_string("controlvector.model_hint", hint)
        else:
            w.add_uint32("controlvector.model_hint", hint)
    if "layer_count" not in drop:
        n = len(directions) if count is None else count
        w.add_int32("controlvector.layer_count", n) if count_int32 else w.add_uint32("controlvector.layer_count", n)
    if "general.architecture" in drop:
        w.kv_data[0].pop("general.architecture")
    for k, v in (extra or {}).items():
        w.add_string(k, v)
    for name, v in directions.items():
        name = name if isinstance(name, str) else f"direction.{name}"
        w.add_tensor(name, np.asarray(v, dtype=dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def rand_vec(n, seed, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def ids_for(model, batch=2, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (batch, length), generator=g)


def logits_with_hook(model, ids, layer, vec):
    """Oracle independent of fusesteer: a plain forward hook adding vec to decoder layer `layer`'s output."""
    def hook(_m, _inp, out):
        if isinstance(out, tuple):
            return (out[0] + vec,) + out[1:]
        return out + vec
    h = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        h.remove()


def steered_logits(model, plan, ids, backend="torch"):
    with fs.attach(model, plan, backend=backend), torch.no_grad():
        return model(ids).logits


def greedy_logits(model, ids, steps=4):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.fixture
def llama(tiny_models):
    return tiny_models("llama")  # 3 layers, hidden 64


# ------------------------------------------------------------------------------------------------
# GGUF: round trip and layer mapping


def test_roundtrip_plan_gguf_plan_is_exact(llama, tmp_path):
    spec = fs.ModelSpec.from_model(llama)
    g = torch.Generator().manual_seed(3)
    plan = fs.SteeringPlan(spec, name="happy")
    for layer in (1, 2):
        plan.add(layer=layer, site="layer.out", b=torch.randn(spec.hidden_size, generator=g) * 3)
    path = tmp_path / "happy.gguf"
    write_control_vector(plan, path)

    back = read_control_vector(path, llama)
    assert back.spec == spec and back.name == "happy"
    assert [(e.layer, e.site, e.gating, e.a, e.dims) for e in back.entries] == \
        [(1, "layer.out", "all", None, None), (2, "layer.out", "all", None, None)]
    for e0, e1 in zip(plan.entries, back.entries):
        assert e1.b.dtype == torch.float32 and torch.equal(e0.b, e1.b)

    unbound = read_control_vector(path)  # no model: unbound plan, same values
    assert unbound.spec is None
    assert all(torch.equal(a.b, b.b) for a, b in zip(plan.entries, unbound.entries))
    rec = unbound.metadata["files"][0]
    assert rec["model_hint"] == "llama" and rec["layer_count"] == 2 and rec["layers"] == [1, 2]
    assert rec["model_fingerprint"] == spec.fingerprint()

    # and through the fusesteer file format again
    back.save(tmp_path / "p.safetensors")
    again = fs.SteeringPlan.load(tmp_path / "p.safetensors")
    assert all(torch.equal(a.b, b.b) for a, b in zip(plan.entries, again.entries))


@pytest.mark.parametrize("n", [1, 2])
def test_independent_writer_maps_direction_n_to_layer_n_output(llama, tmp_path, n):
    """direction.N (written by gguf.GGUFWriter, not by us) steers layer N's output: not N-1, not N+1."""
    H, L = llama.config.hidden_size, llama.config.num_hidden_layers
    v = rand_vec(H, seed=n, scale=4.0)
    path = write_raw(tmp_path / "cv.gguf", {n: v})
    plan = read_control_vector(path, llama, scale=0.5)
    ids = ids_for(llama)
    ours = steered_logits(llama, plan, ids)
    vec = torch.from_numpy(v) * 0.5
    oracle = logits_with_hook(llama, ids, n, vec)
    assert (ours - oracle).abs().max().item() <= FP32_ABS
    by_hand = fs.SteeringPlan.for_model(llama).add(layer=n, site="layer.out", b=vec)
    assert torch.equal(steered_logits(llama, by_hand, ids, backend="reference"),
                       steered_logits(llama, plan, ids, backend="reference"))
    for other in (n - 1, n + 1):
        if 0 <= other < L:
            assert (ours - logits_with_hook(llama, ids, other, vec)).abs().max().item() > 1e-2, \
                f"direction.{n} is indistinguishable from layer {other}"


def test_scale_and_inclusive_layer_range(llama, tmp_path):
    H = llama.config.hidden_size
    v1, v2 = rand_vec(H, 1), rand_vec(H, 2)
    path = write_raw(tmp_path / "cv.gguf", {1: v1, 2: v2})
    p = read_control_vector(path, llama, scale=-2.5)
    assert [e.layer for e in p.entries] == [1, 2]
    assert torch.equal(p.entries[0].b, torch.from_numpy(v1) * -2.5)
    assert torch.equal(p.entries[1].b, torch.from_numpy(v2) * -2.5)
    assert [e.layer for e in read_control_vector(path, llama, layer_range=(2, 2)).entries] == [2]
    assert [e.layer for e in read_control_vector(path, llama, layer_range=(1, 2)).entries] == [1, 2]
    assert [e.layer for e in read_control_vector(path, llama, layer_range=(0, 1)).entries] == [1]
    assert read_control_vector(path, layer_range=(0, 1)).metadata["layer_range"] == [0, 1]
    with pytest.raises(ControlVectorError, match=r"keeps none of the directions"):
        read_control_vector(path, llama, layer_range=(0, 0))
    with pytest.raises(ControlVectorError, match=r"start <= end"):
        read_control_vector(path, llama, layer_range=(2, 1))
    with pytest.raises(ControlVectorError, match=r"scale must be finite"):
        read_control_vector(path, llama, scale=math.nan)


def test_metadata_written_by_llama_cpp_cvector_generator_is_accepted(tmp_path):
    """llama.cpp's cvector-generator writes layer_count as int32 (= number of directions, n_layer - 1)."""
    path = write_raw(tmp_path / "cv.gguf", {1: rand_vec(64, 1), 2: rand_vec(64, 2)}, count=2, count_int32=True)
    info, dirs = inspect_control_vector(path)
    assert info["layer_count"] == 2 and sorted(dirs) == [1, 2] and info["hidden_size"] == 64
    bad = write_raw(tmp_path / "neg.gguf", {1: rand_vec(64, 1)}, count=-1, count_int32=True)
    with pytest.raises(ControlVectorError, match=r"layer_count must be a non-negative integer"):
        inspect_control_vector(bad)


def test_several_files_sum(llama, tmp_path):
    H = llama.config.hidden_size
    a1, a2, b2 = rand_vec(H, 10), rand_vec(H, 11), rand_vec(H, 12)
    f1 = write_raw(tmp_path / "a.gguf", {1: a1, 2: a2})
    f2 = write_raw(tmp_path / "b.gguf", {2: b2})
    p = read_control_vectors([(f1, 0.5), (f2, 2.0)], llama)
    assert [e.layer for e in p.entries] == [1, 2]
    assert torch.equal(p.entries[0].b, torch.from_numpy(a1) * 0.5)
    assert torch.allclose(p.entries[1].b, torch.from_numpy(0.5 * a2 + 2.0 * b2), atol=1e-6, rtol=0)
    assert [r["scale"] for r in p.metadata["files"]] == [0.5, 2.0]
    # summing is the same as attaching the two plans composed
    ids = ids_for(llama)
    composed = read_control_vector(f1, llama, 0.5).extend(read_control_vector(f2, llama, 2.0))
    assert (steered_logits(llama, p, ids) - steered_logits(llama, composed, ids)).abs().max().item() <= FP32_ABS
    f3 = write_raw(tmp_path / "c.gguf", {1: rand_vec(H + 1, 3)})
    with pytest.raises(ControlVectorError, match=r"previous file"):
        read_control_vectors([f1, f3])


def test_directions_added_to_the_final_layer_too(llama, tmp_path):
    """The last layer's output (before the final norm) is addressable: direction.{L-1}."""
    H, L = llama.config.hidden_size, llama.config.num_hidden_layers
    v = rand_vec(H, 5, 3.0)
    plan = read_control_vector(write_raw(tmp_path / "cv.gguf", {L - 1: v}), llama)
    ids = ids_for(llama)
    assert (steered_logits(llama, plan, ids) - logits_with_hook(llama, ids, L - 1, torch.from_numpy(v))
            ).abs().max().item() <= FP32_ABS


# ------------------------------------------------------------------------------------------------
# GGUF: bad files


def _dup_name(path, tmp_path):
    """Two tensors with the same name: written as direction.1/direction.2, then renamed in the bytes."""
    write_raw(path, {1: rand_vec(64, 1), 2: rand_vec(64, 2)})
    data = path.read_bytes()
    assert data.count(b"direction.2") == 1
    path.write_bytes(data.replace(b"direction.2", b"direction.1"))


BAD = {
    "wrong_arch": (lambda p, t: write_raw(p, {1: rand_vec(64, 1)}, arch="llama"),
                   r"general.architecture is 'llama', expected 'controlvector'"),
    "missing_arch": (lambda p, t: write_raw(p, {1: rand_vec(64, 1)}, drop=("general.architecture",)),
                     r"missing key 'general.architecture'"),
    "missing_hint": (lambda p, t: write_raw(p, {1: rand_vec(64, 1)}, drop=("model_hint",)),
                     r"missing key 'controlvector.model_hint'"),
    "missing_count": (lambda p, t: write_raw(p, {1: rand_vec(64, 1)}, drop=("layer_count",)),
                      r"missing key 'controlvector.layer_count'"),
    "hint_not_string": (lambda p, t: write_raw(p, {1: rand_vec(64, 1)}, hint=7),
                        r"model_hint must be a string"),
    "f16": (lambda p, t: write_raw(p, {1: rand_vec(64, 1)}, dtype=np.float16),
            r"type F16; control vectors must be F32"),
    "f64": (lambda p, t: write_raw(p, {1: rand_vec(64, 1)}, dtype=np.float64), r"must be F32"),
    "two_dims": (lambda p, t: write_raw(p, {1: rand_vec(64, 1).reshape(8, 8)}), r"must be 1-D"),
    "nan": (lambda p, t: write_raw(p, {1: np.where(np.arange(64) == 5, np.nan, 1.0)}),
            r"NaN or Inf \(first at index 5\)"),
    "inf": (lambda p, t: write_raw(p, {2: np.where(np.arange(64) == 0, np.inf, 1.0)}), r"NaN or Inf"),
    "unequal_lengths": (lambda p, t: write_raw(p, {1: rand_vec(64, 1), 2: rand_vec(63, 2)}),
                        r"'direction.2' has length 63 but 'direction.1' has length 64"),
    "bad_name": (lambda p, t: write_raw(p, {"steer.1": rand_vec(64, 1)}), r"not named 'direction.<layer>'"),
    "bad_index": (lambda p, t: write_raw(p, {"direction.x": rand_vec(64, 1)}), r"not named 'direction.<layer>'"),
    "same_layer_twice": (lambda p, t: write_raw(p, {"direction.2": rand_vec(64, 1), "direction.02": rand_vec(64, 2)}),
                         r"duplicate direction for layer 2"),
    "same_name_twice": (_dup_name, r"duplicate direction tensor 'direction.1'"),
    "no_tensors": (lambda p, t: write_raw(p, {}), r"holds no direction tensors"),
    "not_gguf": (lambda p, t: p.write_bytes(b"PK\x03\x04" + bytes(200)), r"not a readable GGUF file"),
    "truncated": (lambda p, t: (write_raw(p, {1: rand_vec(64, 1)}), p.write_bytes(p.read_bytes()[:100])),
                  r"not a readable GGUF file"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_give_clear_errors(tmp_path, case):
    make, pattern = BAD[case]
    path = tmp_path / "bad.gguf"
    make(path, tmp_path)
    with pytest.raises(ControlVectorError, match=pattern) as exc:
        read_control_vector(path)
    assert isinstance(exc.value, fs.PlanError)
    assert str(path) in str(exc.value)


def test_files_that_do_not_fit_the_model(llama, tmp_path):
    with pytest.raises(ControlVectorError, match=r"length 32 but the model's hidden size is 64"):
        read_control_vector(write_raw(tmp_path / "a.gguf", {1: rand_vec(32, 1)}), llama)
    path = write_raw(tmp_path / "b.gguf", {3: rand_vec(64, 1)})
    with pytest.raises(ControlVectorError, match=r"direction.3 is out of range: the model has 3 layers"):
        read_control_vector(path, llama)
    unbound = read_control_vector(path)  # no model to check against: caught when attached
    with pytest.raises(fs.PlanError, match=r"layer 3 is out of range"):
        fs.attach(llama, unbound)
    with pytest.raises(ControlVectorError, match=r"cannot read control vector file"):
        read_control_vector(tmp_path / "missing.gguf")


def test_direction_zero_is_read_as_layer_zero(llama, tmp_path):
    """llama.cpp rejects direction.0; repeng and fusesteer give it its natural meaning (layer 0 output)."""
    v = rand_vec(64, 4, 3.0)
    plan = read_control_vector(write_raw(tmp_path / "z.gguf", {0: v}), llama)
    ids = ids_for(llama)
    assert (steered_logits(llama, plan, ids) - logits_with_hook(llama, ids, 0, torch.from_numpy(v))
            ).abs().max().item() <= FP32_ABS


# ------------------------------------------------------------------------------------------------
# GGUF: export refusals and densifying


def test_export_refuses_what_a_control_vector_cannot_express(llama, tmp_path):
    spec = fs.ModelSpec.from_model(llama)
    H = spec.hidden_size
    out = tmp_path / "x.gguf"
    cases = [
        (lambda p: p.add(layer=1, site="mlp.out", b=torch.ones(H)), r"entry 1 .*site 'mlp.out'"),
        (lambda p: p.add(layer=1, site="layer.out", b=torch.ones(H), gating="prompt"), r"entry 1 .*gated"),
        (lambda p: p.add(layer=2, site="layer.out", a=1.5), r"entry 1 .*gain a != 1"),
        (lambda p: p.add(layer=0, site="layer.out", b=torch.ones(H)), r"entry 1 .*layer 0.*allow_layer0"),
    ]
    for build, pattern in cases:
        plan = fs.SteeringPlan(spec).add(layer=2, site="layer.out", b=torch.ones(H))
        build(plan)
        with pytest.raises(ControlVectorError, match=pattern):
            write_control_vector(plan, out)
        assert not out.exists()
    with pytest.raises(ControlVectorError, match=r"adds nothing"):
        write_control_vector(fs.SteeringPlan(spec), out)
    # layer 0 is written when asked
    p0 = fs.SteeringPlan(spec).add(layer=0, site="layer.out", b=torch.ones(H))
    write_control_vector(p0, out, allow_layer0=True)
    assert inspect_control_vector(out)[0]["layers"] == [0]
    # sparse entries of an unbound plan have no width
    sparse = fs.SteeringPlan(None).add(layer=1, site="layer.out", b=[1.0, 2.0], dims=[3, 5])
    with pytest.raises(ControlVectorError, match=r"sparse \(dims\).*not bound"):
        write_control_vector(sparse, out)


def test_export_densifies_sparse_and_sums_entries(llama, tmp_path):
    spec = fs.ModelSpec.from_model(llama)
    H = spec.hidden_size
    v = torch.randn(H, generator=torch.Generator().manual_seed(0))
    plan = (fs.SteeringPlan(spec)
            .add(layer=1, site="layer.out", b=v)
            .add(layer=1, site="layer.out", a=torch.ones(2), b=[1.0, -2.0], dims=[3, 60])
            .add(layer=2, site="layer.out", b=0.25))
    path = tmp_path / "d.gguf"
    write_control_vector(plan, path, model_hint="custom")
    info, dirs = inspect_control_vector(path)
    assert info["model_hint"] == "custom" and info["layers"] == [1, 2] and info["layer_count"] == 2
    want = v.clone()
    want[3] += 1.0
    want[60] -= 2.0
    assert torch.equal(torch.from_numpy(dirs[1]), want)
    assert torch.equal(torch.from_numpy(dirs[2]), torch.full((H,), 0.25))
    ids = ids_for(llama)
    assert (steered_logits(llama, plan, ids) - steered_logits(llama, read_control_vector(path, llama), ids)
            ).abs().max().item() <= FP32_ABS
    assert control_vector_directions(plan).keys() == {1, 2}


# ------------------------------------------------------------------------------------------------
# peers: steering-vectors


@needs_sv
@pytest.mark.parametrize("layer_type", ["decoder_block", "mlp"])
def test_steering_vectors_parity(llama, layer_type):
    H, L = llama.config.hidden_size, llama.config.num_hidden_layers
    g = torch.Generator().manual_seed(7)
    acts = {0: torch.randn(H, generator=g), -1: torch.randn(H, generator=g)}  # -1: the peer's "last layer"
    sv = steering_vectors.SteeringVector(layer_activations=acts, layer_type=layer_type)
    ids = ids_for(llama)
    with torch.no_grad():
        vanilla = llama(ids).logits
    with sv.apply(llama, multiplier=1.7):
        with torch.no_grad():
            peer = llama(ids).logits
        peer_seq, peer_gen = greedy_logits(llama, ids)
    plan = from_steering_vector(sv, llama, multiplier=1.7)
    site = "layer.out" if layer_type == "decoder_block" else "mlp.out"
    assert [(e.layer, e.site) for e in plan.entries] == [(0, site), (L - 1, site)]
    assert (peer - vanilla).abs().max().item() > 1e-2, "vectors too small: the parity test would be vacuous"
    for backend in ("reference", "torch"):
        assert (steered_logits(llama, plan, ids, backend) - peer).abs().max().item() <= FP32_ABS
        with fs.attach(llama, plan, backend=backend):
            seq, gen = greedy_logits(llama, ids)
        assert torch.equal(seq, peer_seq)
        assert (gen - peer_gen).abs().max().item() <= FP32_ABS


@needs_sv
def test_steering_vectors_errors(llama):
    H = llama.config.hidden_size
    sv = steering_vectors.SteeringVector(layer_activations={1: torch.ones(H)}, layer_type="self_attn")
    with pytest.raises(fs.PlanError, match=r"layer_type 'self_attn' has no fusesteer site"):
        from_steering_vector(sv, llama)
    sv = steering_vectors.SteeringVector(layer_activations={5: torch.ones(H)})
    with pytest.raises(fs.PlanError, match=r"layer 5 is out of range for a model with 3 layers"):
        from_steering_vector(sv, llama)
    sv = steering_vectors.SteeringVector(layer_activations={1: torch.ones(H + 2)})
    with pytest.raises(fs.PlanError, match=r"66 elements .* expected the model width 64"):
        from_steering_vector(sv, llama)
    sv = steering_vectors.SteeringVector(layer_activations={2: torch.ones(H), -1: torch.ones(H)})
    with pytest.raises(fs.PlanError, match=r"appears twice"):
        from_steering_vector(sv, llama)
    with pytest.raises(fs.PlanError, match=r"expected a steering_vectors.SteeringVector"):
        from_steering_vector({1: torch.ones(H)}, llama)


# ------------------------------------------------------------------------------------------------
# peers: repeng


def _repeng_vector(H, layers, seed=0):
    rng = np.random.default_rng(seed)
    return repeng.ControlVector(model_type="llama",
                                directions={l: rng.standard_normal(H).astype(np.float32) for l in layers})


@needs_repeng
def test_repeng_parity(llama):
    H, L = llama.config.hidden_size, llama.config.num_hidden_layers
    cv = _repeng_vector(H, range(1, L))  # repeng's default: layers L-1 .. 1
    ids = ids_for(llama, batch=1)  # repeng's ControlModel forward fails at batch > 1 (position_ids shape)
    cm = repeng.ControlModel(llama, [-1, 1])
    try:
        cm.set_control(cv, coeff=-1.3)
        with torch.no_grad():
            peer = cm(ids).logits
        peer_seq, peer_gen = greedy_logits(cm, ids)
    finally:
        cm.reset()
        cm.unwrap()
    plan = from_repeng(cv, llama, coeff=-1.3, layer_ids=[-1, 1])
    assert [e.layer for e in plan.entries] == [1, L - 1]
    for backend in ("reference", "torch"):
        assert (steered_logits(llama, plan, ids, backend) - peer).abs().max().item() <= FP32_ABS
        with fs.attach(llama, plan, backend=backend):
            seq, gen = greedy_logits(llama, ids)
        assert torch.equal(seq, peer_seq)
        assert (gen - peer_gen).abs().max().item() <= FP32_ABS
    with torch.no_grad():
        assert (llama(ids).logits - peer).abs().max().item() > 1e-2, "vacuous parity: steering had no effect"


@needs_repeng
def test_repeng_gguf_both_ways(llama, tmp_path):
    """repeng's export_gguf is read by us with repeng's own layer mapping, and repeng reads our files."""
    H, L = llama.config.hidden_size, llama.config.num_hidden_layers
    cv = _repeng_vector(H, range(1, L), seed=4)
    path = tmp_path / "repeng.gguf"
    cv.export_gguf(str(path))
    plan = read_control_vector(path, llama, scale=0.9)
    ids = ids_for(llama, batch=1)
    cm = repeng.ControlModel(llama, list(range(1, L)))
    try:
        cm.set_control(cv, coeff=0.9)
        with torch.no_grad():
            peer = cm(ids).logits
    finally:
        cm.reset()
        cm.unwrap()
    assert (steered_logits(llama, plan, ids) - peer).abs().max().item() <= FP32_ABS

    ours = tmp_path / "ours.gguf"
    write_control_vector(from_repeng(cv, llama), ours)
    back = repeng.ControlVector.import_gguf(str(ours))
    assert back.model_type == "llama" and sorted(back.directions) == list(range(1, L))
    for l in range(1, L):
        assert np.array_equal(np.asarray(back.directions[l]), cv.directions[l])


@needs_repeng
def test_repeng_errors(llama):
    H = llama.config.hidden_size
    cv = _repeng_vector(H, [1, 2])
    with pytest.raises(fs.PlanError, match=r"no direction for layer 0"):
        from_repeng(cv, llama, layer_ids=[0])
    with pytest.raises(fs.PlanError, match=r"out of range"):
        from_repeng(cv, llama, layer_ids=[7])
    bad = repeng.ControlVector(model_type="llama", directions={1: np.ones(H + 1, dtype=np.float32)})
    with pytest.raises(fs.PlanError, match=r"65 elements"):
        from_repeng(bad, llama)
    nan = repeng.ControlVector(model_type="llama", directions={1: np.full(H, np.nan, dtype=np.float32)})
    with pytest.raises(fs.PlanError, match=r"NaN"):
        from_repeng(nan, llama)


@pytest.mark.parametrize("path", [None, 5, 2.5, ["a.gguf"], "", "a\0b.gguf"])
def test_control_vector_path_must_be_a_path(path):
    from fusesteer.interop.gguf_cv import ControlVectorError, inspect_control_vector, read_control_vector

    for call in (lambda: read_control_vector(path), lambda: inspect_control_vector(path)):
        with pytest.raises(ControlVectorError, match="expected a control vector file path"):
            call()
