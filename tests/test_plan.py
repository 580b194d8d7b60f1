"""Plan IR: validation messages, composition, file format."""

import json
import struct

import pytest
import torch

import fusesteer as fs
from fusesteer.runtime.plan import compose

SPEC = fs.ModelSpec("llama", num_layers=4, hidden_size=8, intermediate_size=12, attn_width=8)


def plan():
    return fs.SteeringPlan.for_spec(SPEC)


@pytest.mark.parametrize("kwargs, match", [
    (dict(layer=4, site="layer.out", b=torch.zeros(8)), r"entry 0 \(layer=4.*out of range; the model has 4 layers"),
    (dict(layer=-1, site="layer.out", b=torch.zeros(8)), r"layer -1 is negative"),
    (dict(layer=0, site="mlp.in", b=torch.zeros(8)), r"unknown site 'mlp.in'; expected one of layer.out"),
    (dict(layer=0, site="layer.out", b=torch.zeros(8), gating="decode"), r"unknown gating 'decode'"),
    (dict(layer=0, site="layer.out", b=torch.zeros(7)), r"b has length 7, expected the site width 8"),
    (dict(layer=0, site="mlp.down_proj.in", a=torch.ones(8)), r"a has length 8, expected the site width 12"),
    (dict(layer=0, site="attn.o_proj.in", dims=[0, 8], a=[1.0, 2.0]),
     r"dims index 8 is out of range for site 'attn.o_proj.in' of width 8"),
    (dict(layer=0, site="attn.o_proj.in", dims=[1, 1], a=[1.0, 2.0]), r"duplicate"),
    (dict(layer=0, site="attn.o_proj.in", dims=[1, 2], a=[1.0, 2.0, 3.0]), r"a has length 3, expected len\(dims\)=2"),
    (dict(layer=0, site="layer.out", b=torch.full((8,), float("nan"))), r"b contains NaN or Inf"),
    (dict(layer=0, site="layer.out", a=float("inf")), r"a contains NaN or Inf"),
    (dict(layer=0, site="layer.out", a=torch.ones(2, 8)), r"scalar or 1-D"),
    (dict(layer=0, site="layer.out", dims=[0.5], a=[1.0]), r"dims must hold integers"),
    (dict(layer=0, site="layer.out", a="big"), r"a could not be read as a tensor"),
])
def test_bad_entries_raise_plan_error_naming_entry(kwargs, match):
    with pytest.raises(fs.PlanError, match=match):
        plan().add(**kwargs)


def test_plan_for_other_model_rejected(tiny_models):
    model = tiny_models("llama")
    p = plan()
    p.add(layer=0, site="layer.out", b=torch.ones(8))
    with pytest.raises(fs.PlanError,
                       match=r"plan 'plan': plan was built for another model: num_layers is 4 in the plan"):
        fs.attach(model, p)
    other = fs.SteeringPlan.for_model(tiny_models("qwen3"))
    with pytest.raises(fs.PlanError, match="model_type is 'qwen3' in the plan but 'llama' in the model"):
        fs.attach(model, other)


def test_unbound_plan_validated_on_attach(tiny_models):
    model = tiny_models("llama")
    p = fs.SteeringPlan()
    p.add(layer=99, site="layer.out", b=torch.zeros(64))
    with pytest.raises(fs.PlanError, match="layer 99 is out of range"):
        fs.attach(model, p)


def test_composition_equals_sequential_application():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g)
    m1 = (torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g))
    m2 = (torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g))
    a, b = compose(m1, m2)
    seq = m2[0] * (m1[0] * x + m1[1]) + m2[1]
    assert torch.allclose(a * x + b, seq, atol=1e-6)
    p = plan()
    p.add(layer=1, site="layer.out", a=m1[0], b=m1[1])
    p.add(layer=1, site="layer.out", a=m2[0][[2, 5]], b=m2[1][[2, 5]], dims=[2, 5])
    p.add(layer=1, site="layer.out", b=torch.ones(8), gating="generated")
    maps = p.phase_maps()[(1, "layer.out")]
    ap, bp = maps["prompt"]
    exp_a = m1[0].clone()
    exp_b = m1[1].clone()
    exp_a[[2, 5]] *= m2[0][[2, 5]]
    exp_b[[2, 5]] = m2[0][[2, 5]] * m1[1][[2, 5]] + m2[1][[2, 5]]
    assert torch.allclose(ap, exp_a) and torch.allclose(bp, exp_b)
    ag, bg = maps["generated"]
    assert torch.allclose(ag, exp_a) and torch.allclose(bg, exp_b + 1)


def test_save_load_roundtrip(tmp_path):
    p = plan()
    p.name, p.notes = "demo", "two entries"
    p.metadata = {"method": "austeer", "k": 3, "scores": [0.5, 0.25]}
    p.add(layer=0, site="layer.out", b=torch.randn(8))
    p.add(layer=2, site="mlp.down_proj.in", dims=[3, 7, 11], a=[1.5, 0.5, 2.0], gating="generated")
    p.add(layer=3, site="mlp.out", a=0.9)
    path = tmp_path / "p.safetensors"
    p.save(path)
    q = fs.SteeringPlan.load(path)
    assert q.spec == SPEC and q.name == "demo" and q.notes == "two entries" and q.metadata == p.metadata
    assert len(q) == 3
    for e, f in zip(p.entries, q.entries):
        assert (e.layer, e.site, e.gating) == (f.layer, f.site, f.gating)
        for t, u in ((e.a, f.a), (e.b, f.b), (e.dims, f.dims)):
            assert (t is None and u is None) or torch.equal(t, u)
    # no pickle: the file is a plain safetensors blob with a JSON header
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["fusesteer"])
    assert meta["format"] == "fusesteer-plan" and meta["version"] == 1
    assert meta["fingerprint"] == SPEC.fingerprint()


def _rewrite_header(path, fn, reseal=True):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    st = json.loads(raw[8:8 + n])
    meta = json.loads(st["__metadata__"]["fusesteer"])
    fn(st, meta)
    if reseal:  # recompute the checksum so the semantic validation is what has to catch the change
        from fusesteer.runtime.planfile import plan_checksum

        tensors = {}
        for name, d in st.items():
            if name != "__metadata__" and d.get("dtype") in ("F32", "I64"):
                s, e = d["data_offsets"]
                if 0 <= s <= e <= len(raw) - 8 - n:
                    body = raw[8 + n + s:8 + n + e]
                    dt = torch.float32 if d["dtype"] == "F32" else torch.int64
                    if len(body) % dt.itemsize == 0:
                        tensors[name] = torch.frombuffer(bytearray(body), dtype=dt).clone()
        meta["checksum"] = plan_checksum(meta, tensors)
    st["__metadata__"]["fusesteer"] = json.dumps(meta)
    h = json.dumps(st).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])


@pytest.mark.parametrize("mutate, match", [
    (lambda st, m: m.update(fingerprint="0" * 16), "fingerprint"),
    (lambda st, m: m.update(version=2), "version is 2"),
    (lambda st, m: m["entries"][0].update(site="bogus"), "unknown site 'bogus'"),
    (lambda st, m: m["entries"][0].update(gating="sometimes"), "unknown gating"),
    (lambda st, m: m["entries"][0].update(layer=40), "layer 40 is out of range"),
    (lambda st, m: m["entries"][0].update(b={"tensor": "nope"}), "refers to tensor 'nope'"),
    (lambda st, m: m["model"].update(num_layers=-3), "num_layers: expected a positive integer"),
    (lambda st, m: m["entries"].append({"layer": 0, "site": "layer.out", "gating": "all", "a": {"scalar": "x"},
                                        "b": None, "dims": None}),
     "a.scalar must be a finite number"),
    (lambda st, m: st["entries.0.b"].update(dtype="F16"), "dtype 'F16'"),
    (lambda st, m: st["entries.0.b"].update(data_offsets=[0, 9999]), "data_offsets"),
])
def test_corrupted_files_raise_plan_error(tmp_path, mutate, match):
    p = plan()
    p.add(layer=0, site="layer.out", b=torch.randn(8))
    path = tmp_path / "p.safetensors"
    p.save(path)
    _rewrite_header(path, mutate)
    with pytest.raises(fs.PlanError, match=match):
        fs.SteeringPlan.load(path)


def test_checksum_catches_edits(tmp_path):
    p = plan()
    p.add(layer=0, site="layer.out", b=torch.randn(8))
    path = tmp_path / "p.safetensors"
    p.save(path)
    _rewrite_header(path, lambda st, m: m.update(name="renamed"), reseal=False)
    with pytest.raises(fs.PlanError, match="does not match header.checksum"):
        fs.SteeringPlan.load(path)


def test_truncated_and_garbage_files(tmp_path):
    p = plan()
    p.add(layer=0, site="layer.out", b=torch.randn(8))
    path = tmp_path / "p.safetensors"
    p.save(path)
    raw = path.read_bytes()
    for cut in (0, 4, 12, len(raw) - 3):
        path.write_bytes(raw[:cut])
        with pytest.raises(fs.PlanError):
            fs.SteeringPlan.load(path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(fs.PlanError, match="exceeds"):
        fs.SteeringPlan.load(path)
    with pytest.raises(fs.PlanError, match="cannot read plan file"):
        fs.SteeringPlan.load(tmp_path / "missing.safetensors")


def _with_header(path, edit):
    """Rewrite the fusesteer JSON header of a saved plan file (keeping the file otherwise valid)."""
    data = path.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    st = json.loads(data[8:8 + hlen])
    st["__metadata__"]["fusesteer"] = edit(st["__metadata__"]["fusesteer"])
    raw = json.dumps(st).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + hlen:])


def test_metadata_numbers_out_of_float_range_are_refused(tmp_path):
    """1e400 parses as inf: such a plan would load but never save again."""
    p = plan()
    p.metadata = {"score": 1.5}
    p.add(layer=0, site="layer.out", b=torch.randn(8))
    path = tmp_path / "p.safetensors"
    p.save(path)
    _with_header(path, lambda h: h.replace("1.5", "1e400"))
    with pytest.raises(fs.PlanError, match=r"not valid JSON \(number 1e400 is out of the float range"):
        fs.SteeringPlan.load(path)


def test_load_and_from_bytes_refuse_what_is_not_a_file():
    with pytest.raises(fs.PlanError, match="path with a NUL character"):
        fs.SteeringPlan.load("a\0b.safetensors")
    with pytest.raises(fs.PlanError, match=r"from_bytes\(\) expects the bytes of a plan file, got str \(read"):
        fs.SteeringPlan.from_bytes("not bytes")
    with pytest.raises(fs.PlanError, match="got NoneType"):
        fs.SteeringPlan.from_bytes(None)


def test_entry_bound():
    from fusesteer.runtime.plan import MAX_ENTRIES

    p = plan()
    for _ in range(MAX_ENTRIES):
        p.add(layer=0, site="layer.out", a=1.0)
    with pytest.raises(fs.PlanError, match=f"too many entries \\(limit {MAX_ENTRIES}\\)"):
        p.add(layer=0, site="layer.out", a=1.0)
