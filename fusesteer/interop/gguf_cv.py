"""GGUF control vectors (the llama.cpp / repeng convention) <-> fusesteer plans.

File layout
-----------
* ``general.architecture = "controlvector"``
* ``controlvector.model_hint``: string (the model family the vectors were made for, e.g. ``"llama"``)
* ``controlvector.layer_count``: integer (writers disagree on its meaning, see below)
* one F32 1-D tensor ``direction.N`` of length hidden size per steered layer.

Layer mapping: ``direction.N`` == fusesteer ``(layer=N, site="layer.out", a=1, b=scale*v)``
----------------------------------------------------------------------------------------
``N`` is the 0-based decoder layer and the vector is *added to that layer's output* (the residual stream
after the whole block, HF ``model.model.layers[N]`` output = ``output_hidden_states[N+1]``). Verified by
reading the sources (no measurement needed, the code paths are short):

* llama.cpp ``common/common.cpp`` ``common_control_vector_load_one``: parses ``direction.<N>`` with
  ``std::stoi``, rejects ``N == 0`` ("invalid (zero) direction tensor layer index"), non-F32, non-1-D and
  length mismatches, and accumulates ``dst[j] += src[j] * strength`` at buffer offset ``n_embd * (N - 1)``
  (so duplicate directions inside a file and several files are *summed*). Metadata keys are not read.
* llama.cpp ``src/llama-adapter.cpp`` ``llama_adapter_cvec::init/apply``: ``tensors[0]`` is always null
  ("there's never a tensor for layer 0"), and for ``il = 1 .. n_layer-1`` ``tensors[il]`` is filled from
  offset ``n_embd * (il - 1)``. The two ``-1`` cancel: ``tensors[il]`` holds ``direction.il``.
  ``apply_to(cur, il)`` adds ``tensors[il]`` when ``layer_start <= il <= layer_end`` (INCLUSIVE), and the
  model graphs call it as ``cur = build_cvec(cur, il); cb(cur, "l_out", il)``, i.e. on the block output
  after the FFN residual add. ``common_init_from_params`` defaults the range to ``[1, n_layer]``;
  ``--control-vector-layer-range START END`` overrides it, ``--control-vector-scaled FNAME S`` sets the
  strength.
* repeng 0.4.0 (``repeng/extract.py``, ``control.py``): ``read_representations`` defaults to
  ``hidden_layers = range(-1, -num_hidden_layers, -1)`` normalised to ``L-1 .. 1`` (so never layer 0),
  fits direction ``i`` on ``out.hidden_states[i + 1]`` (= output of decoder layer ``i``),
  ``ControlModule`` wraps ``model.model.layers[i]`` and adds ``coeff * direction`` to its output, and
  ``export_gguf`` writes ``direction.{i}`` verbatim with ``layer_count = len(directions)``.
  So repeng's ``direction.N`` is also "added to layer N's output": the three agree, and it is the mapping
  implemented here. ("fit on hidden_states[N+1], added to layer N's output" is the same
  statement: ``hidden_states[N+1]`` *is* layer N's output. One wrinkle that affects only how repeng *fits*
  the last layer, not how anything applies it: in transformers 5.x ``hidden_states[L]`` is taken after the
  final norm, so repeng's ``direction.{L-1}`` is fit post-norm yet added pre-norm, like everywhere else.)

Consequences: llama.cpp can never steer layer 0. We read ``direction.0`` (repeng can write it when asked
for layer 0, and it has a well-defined meaning), but :func:`write_control_vector` refuses a plan that
steers layer 0 unless ``allow_layer0=True``, because llama.cpp would reject the whole file.
``controlvector.layer_count`` is the number of direction tensors for repeng and llama.cpp's
cvector-generator, the model's layer count for some other writers; it is kept in the plan metadata and
not used for the mapping. The file holds no model shape: without a model/spec the plan is unbound
(``spec=None``) and is bound (and checked) when attached.
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..errors import PlanError
from ..extras import require
from ..runtime.plan import ModelSpec, SteeringPlan


def _gguf():
    return require("gguf", "gguf", "reading and writing GGUF control vectors")


log = logging.getLogger("fusesteer")

ARCH = "controlvector"
KEY_ARCH = "general.architecture"
KEY_HINT = f"{ARCH}.model_hint"
KEY_COUNT = f"{ARCH}.layer_count"
# Our own extra keys (ignored by llama.cpp and repeng): where the plan came from.
KEY_FS_NAME = "fusesteer.plan_name"
KEY_FS_SPEC = "fusesteer.model_fingerprint"

MAX_LAYER = 100_000  # sanity bound on direction.N when no model is known
MAX_CV_BYTES = 2 * 1024 * 1024 * 1024
_DIRECTION_RE = re.compile(r"direction\.([0-9]{1,9})")  # used with fullmatch: no trailing newline


class ControlVectorError(PlanError):
    """A GGUF control-vector file is malformed, does not fit the model, or a plan cannot be exported."""


# --------------------------------------------------------------------------------------------------
# helpers


def _spec_of(spec_or_model) -> ModelSpec | None:
    """ModelSpec from a ModelSpec, a HF model, a HF config, or None."""
    if spec_or_model is None or isinstance(spec_or_model, ModelSpec):
        return spec_or_model
    if hasattr(spec_or_model, "config") and hasattr(spec_or_model.config, "num_hidden_layers"):
        return ModelSpec.from_model(spec_or_model)
    if hasattr(spec_or_model, "num_hidden_layers") or hasattr(spec_or_model, "text_config"):
        try:
            return ModelSpec.from_config(spec_or_model)
        except AttributeError as e:
            raise ControlVectorError(f"cannot read the model shape from {type(spec_or_model).__name__}: {e}") from None
    raise ControlVectorError(f"expected a ModelSpec, a Hugging Face model or config, or None; got "
                             f"{type(spec_or_model).__name__}")


def _check_scale(scale, where: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise ControlVectorError(f"{where}: scale must be a number, got {scale!r}")
    s = float(scale)
    if not math.isfinite(s):
        raise ControlVectorError(f"{where}: scale must be finite, got {scale!r}")
    return s


def _check_range(layer_range) -> tuple[int, int] | None:
    if layer_range is None:
        return None
    try:
        lo, hi = layer_range
    except (TypeError, ValueError):
        raise ControlVectorError(f"layer_range must be a pair (start, end), got {layer_range!r}") from None
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ControlVectorError(f"layer_range must hold two integers, got {layer_range!r}")
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi < lo:
        raise ControlVectorError(f"layer_range ({lo}, {hi}) is invalid: need 0 <= start <= end "
                                 "(both inclusive, 0-based decoder layers)")
    return lo, hi


def _field_value(reader, key: str, path: str):
    """(present, value, type names) of a GGUF key-value field."""
    GGUFValueType = _gguf().GGUFValueType

    f = reader.fields.get(key)
    if f is None:
        return False, None, None
    types = list(f.types)
    if not types:
        return True, None, []
    if types[0] == GGUFValueType.ARRAY:
        return True, None, [t.name for t in types]
    try:
        return True, f.contents(), [t.name for t in types]
    except Exception as e:  # noqa: BLE001
        raise ControlVectorError(f"{path}: metadata {key!r} cannot be decoded ({type(e).__name__}: {e})") from None


_INT_TYPES = {"UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64"}


def _open_reader(path: str):
    GGUFReader = _gguf().GGUFReader

    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ControlVectorError(f"cannot read control vector file {path!r}: {e.strerror or e}") from None
    if size > MAX_CV_BYTES:
        raise ControlVectorError(f"{path}: {size} bytes is too large for a control vector file "
                                 f"(limit {MAX_CV_BYTES}); is this a model GGUF?")
    try:
        return GGUFReader(path, "r")
    except ValueError as e:
        msg = str(e)
        if "duplicated tensor" in msg.lower():
            name = msg.rsplit(" ", 1)[-1]
            raise ControlVectorError(f"{path}: duplicate direction tensor {name!r}: each layer may appear once "
                                     "(sum the vectors before writing, or pass several files)") from None
        raise ControlVectorError(f"{path}: not a readable GGUF file ({msg})") from None
    except Exception as e:  # noqa: BLE001 - struct/numpy/memmap errors on truncated or random bytes
        raise ControlVectorError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _cv_path(path) -> str:
    """``path`` as a str, or ControlVectorError for what is not a usable file path."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise ControlVectorError(f"expected a control vector file path (str or os.PathLike), got "
                                 f"{type(path).__name__} {path!r}")
    path = os.fsdecode(os.fspath(path))
    if not path or "\0" in path:
        raise ControlVectorError(f"expected a control vector file path, got {path!r}")
    return path


def inspect_control_vector(path: str | os.PathLike) -> tuple[dict, dict[int, np.ndarray]]:
    """Read and validate one GGUF control vector: (header info, {layer: float32 vector}).

    Checks everything that does not need the model: architecture, required keys and their types, tensor
    names, dtype (F32), rank (1-D), equal lengths, finiteness, duplicate layers.
    """
    path = _cv_path(path)
    reader = _open_reader(path)
    try:
        present, arch, types = _field_value(reader, KEY_ARCH, path)
        if not present:
            raise ControlVectorError(f"{path}: missing key {KEY_ARCH!r}; a control vector file must have "
                                     f"{KEY_ARCH} = {ARCH!r}")
        if arch != ARCH:
            hint = " (this looks like a model file, not a control vector)" if isinstance(arch, str) else ""
            raise ControlVectorError(f"{path}: {KEY_ARCH} is {arch!r}, expected {ARCH!r}{hint}")
        present, hint_v, types = _field_value(reader, KEY_HINT, path)
        if not present:
            raise ControlVectorError(f"{path}: missing key {KEY_HINT!r} (llama.cpp's cvector-generator and "
                                     "repeng always write it)")
        if types != ["STRING"]:
            raise ControlVectorError(f"{path}: {KEY_HINT} must be a string, got GGUF type {types}")
        present, count, types = _field_value(reader, KEY_COUNT, path)
        if not present:
            raise ControlVectorError(f"{path}: missing key {KEY_COUNT!r} (llama.cpp's cvector-generator and "
                                     "repeng always write it)")
        if not types or len(types) != 1 or types[0] not in _INT_TYPES or int(count) < 0:
            raise ControlVectorError(f"{path}: {KEY_COUNT} must be a non-negative integer, got {count!r} "
                                     f"(GGUF type {types})")
        info: dict[str, Any] = {"model_hint": hint_v, "layer_count": int(count)}
        for key, out in ((KEY_FS_NAME, "plan_name"), (KEY_FS_SPEC, "model_fingerprint")):
            present, v, types = _field_value(reader, key, path)
            if present and types == ["STRING"]:
                info[out] = v

        if not reader.tensors:
            raise ControlVectorError(f"{path}: the file holds no direction tensors")
        GGMLQuantizationType = _gguf().GGMLQuantizationType

        dirs: dict[int, np.ndarray] = {}
        names: dict[int, str] = {}
        width = None
        for t in reader.tensors:
            m = _DIRECTION_RE.fullmatch(t.name)
            if m is None:
                raise ControlVectorError(f"{path}: tensor {t.name!r} is not named 'direction.<layer>' "
                                         "(<layer> a 0-based decoder layer number)")
            layer = int(m.group(1))
            if layer > MAX_LAYER:
                raise ControlVectorError(f"{path}: tensor {t.name!r}: layer {layer} is out of range")
            if layer in dirs:
                raise ControlVectorError(f"{path}: duplicate direction for layer {layer} ({names[layer]!r} and "
                                         f"{t.name!r}); each layer may appear once")
            if t.tensor_type != GGMLQuantizationType.F32:
                raise ControlVectorError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}; control "
                                         "vectors must be F32")
            shape = [int(d) for d in t.shape]
            if len(shape) != 1:
                raise ControlVectorError(f"{path}: tensor {t.name!r} has shape {shape}; control vectors must be 1-D")
            n = shape[0]
            if n == 0:
                raise ControlVectorError(f"{path}: tensor {t.name!r} is empty")
            if width is None:
                width = n
            elif n != width:
                raise ControlVectorError(f"{path}: tensor {t.name!r} has length {n} but {names[min(names)]!r} has "
                                         f"length {width}; all directions must have the hidden size")
            v = np.array(t.data, dtype=np.float32, copy=True).reshape(n)
            if not np.isfinite(v).all():
                bad = int(np.flatnonzero(~np.isfinite(v))[0])
                raise ControlVectorError(f"{path}: tensor {t.name!r} contains NaN or Inf (first at index {bad})")
            dirs[layer] = v
            names[layer] = t.name
        info["hidden_size"] = width
        info["layers"] = sorted(dirs)
        return info, dirs
    finally:
        del reader  # drops the memmap (vectors were copied out)


# --------------------------------------------------------------------------------------------------
# reading


def read_control_vectors(files: Iterable, spec_or_model=None, layer_range=None,
                         name: str | None = None) -> SteeringPlan:
    """Sum several GGUF control vectors into one plan, like llama.cpp's repeated ``--control-vector-scaled``.

    ``files``: paths, or ``(path, scale)`` pairs. Each file's directions are multiplied by its scale and
    summed per layer (fp32, in file order). ``layer_range``: optional INCLUSIVE ``(start, end)`` of 0-based
    layers to keep (``--control-vector-layer-range``). ``spec_or_model``: a ModelSpec or HF model/config to
    bind and check the plan against (hidden size, layer indices); None gives an unbound plan.
    """
    spec = _spec_of(spec_or_model)
    rng = _check_range(layer_range)
    items = []
    for item in files:
        if isinstance(item, (str, os.PathLike)):
            path, scale = item, 1.0
        else:
            try:
                path, scale = item
            except (TypeError, ValueError):
                raise ControlVectorError(f"expected a path or a (path, scale) pair, got {item!r}") from None
        path = _cv_path(path)
        items.append((path, _check_scale(scale, path)))
    if not items:
        raise ControlVectorError("no control vector files given")

    sums: dict[int, torch.Tensor] = {}
    width = None
    records = []
    for path, scale in items:
        info, dirs = inspect_control_vector(path)
        if spec is not None and info["hidden_size"] != spec.hidden_size:
            raise ControlVectorError(f"{path}: directions have length {info['hidden_size']} but the model's hidden "
                                     f"size is {spec.hidden_size} (control vector made for {info['model_hint']!r}, "
                                     f"model is {spec.model_type!r})")
        if width is not None and info["hidden_size"] != width:
            raise ControlVectorError(f"{path}: directions have length {info['hidden_size']}, but the previous file(s) "
                                     f"have length {width}; control vectors to sum must be for the same model")
        width = info["hidden_size"]
        if spec is not None:
            over = [l for l in info["layers"] if l >= spec.num_layers]
            if over:
                raise ControlVectorError(f"{path}: direction.{over[0]} is out of range: the model has "
                                         f"{spec.num_layers} layers (0..{spec.num_layers - 1})")
        for layer in info["layers"]:
            if rng is not None and not (rng[0] <= layer <= rng[1]):
                continue
            v = torch.from_numpy(dirs[layer]) * scale
            sums[layer] = v if layer not in sums else sums[layer] + v
        records.append({"path": path, "scale": scale, "model_hint": info["model_hint"],
                        "layer_count": info["layer_count"], "layers": info["layers"],
                        **{k: info[k] for k in ("plan_name", "model_fingerprint") if k in info}})
    if not sums:
        all_layers = sorted({l for r in records for l in r["layers"]})
        raise ControlVectorError(f"layer range {list(rng)} keeps none of the directions (the file(s) steer layers "
                                 f"{_fmt_layers(all_layers)})")
    if spec is not None:
        fps = {r.get("model_fingerprint") for r in records} - {None}
        for fp in fps:
            if fp != spec.fingerprint():
                log.warning("fusesteer: control vector was exported from a plan for model fingerprint %s, "
                            "binding it to %s (%s)", fp, spec.fingerprint(), spec.model_type)
    hints = sorted({r["model_hint"] for r in records})
    if spec is not None and hints and spec.model_type not in hints:
        log.info("fusesteer: control vector model_hint %s, model type %r", hints, spec.model_type)

    if name is None and len(records) == 1 and records[0].get("plan_name"):
        name = records[0]["plan_name"]
    if name is None:
        stems = [os.path.splitext(os.path.basename(p))[0] for p, _ in items]
        name = "+".join(stems) if len(stems) <= 3 else f"{stems[0]}+{len(stems) - 1} more"
    meta = {"source": "gguf-control-vector", "files": records, "layer_range": list(rng) if rng else None}
    plan = SteeringPlan(spec, name=name, metadata=meta)
    for layer in sorted(sums):
        plan.add(layer=layer, site="layer.out", b=sums[layer])
    return plan


def read_control_vector(path: str | os.PathLike, spec_or_model=None, scale: float = 1.0,
                        layer_range: Sequence[int] | None = None) -> SteeringPlan:
    """One GGUF control vector -> plan adding ``scale * direction.N`` to the output of layer N.

    ``layer_range``: optional INCLUSIVE ``(start, end)`` of 0-based layers to keep (llama.cpp's
    ``--control-vector-layer-range``); ``scale`` is llama.cpp's ``--control-vector-scaled`` strength.
    Without ``spec_or_model`` the plan is unbound (bound and checked at attach time).
    Raises :class:`ControlVectorError` (a :class:`~fusesteer.errors.PlanError`) on any bad file.
    """
    return read_control_vectors([(path, scale)], spec_or_model=spec_or_model, layer_range=layer_range)


def _fmt_layers(layers: Sequence[int]) -> str:
    if not layers:
        return "none"
    if list(layers) == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(map(str, layers))


# --------------------------------------------------------------------------------------------------
# writing


def control_vector_directions(plan: SteeringPlan, allow_layer0: bool = False) -> dict[int, np.ndarray]:
    """{layer: float32 vector} of a plan made only of additions to ``layer.out`` (else ControlVectorError).

    Entries at the same layer are summed (additive maps compose by adding their b); sparse ``dims`` are
    densified to the hidden size (needs a bound plan). Identity entries (no a, no b) are skipped.
    """
    if not isinstance(plan, SteeringPlan):
        raise ControlVectorError(f"expected a SteeringPlan, got {type(plan).__name__}")
    plan.validate()
    spec = plan.spec
    width = spec.hidden_size if spec is not None else None
    out: dict[int, torch.Tensor] = {}
    for i, e in enumerate(plan.entries):
        where = e.describe(i)
        if e.site != "layer.out":
            raise ControlVectorError(f"cannot export to a GGUF control vector: {where} acts on site {e.site!r}; "
                                     "control vectors can only add a vector to 'layer.out'")
        if e.gating != "all":
            raise ControlVectorError(f"cannot export to a GGUF control vector: {where} is gated to "
                                     f"{e.gating!r} tokens; control vectors apply to every token")
        if e.a is not None and not bool((e.a == 1).all()):
            raise ControlVectorError(f"cannot export to a GGUF control vector: {where} has a gain a != 1 "
                                     f"(a ranges {float(e.a.min()):g}..{float(e.a.max()):g}); control vectors are "
                                     "pure additions (a = 1)")
        if e.b is None:
            continue
        if e.layer == 0 and not allow_layer0:
            raise ControlVectorError(f"cannot export to a GGUF control vector: {where} steers layer 0, which "
                                     "llama.cpp cannot address (it rejects the whole file on 'direction.0'); "
                                     "pass allow_layer0=True (CLI: --allow-layer0) to write it anyway for "
                                     "repeng/fusesteer readers")
        if e.dims is not None:
            if width is None:
                raise ControlVectorError(f"cannot export {where}: it is sparse (dims) and the plan is not bound to "
                                         "a model, so the hidden size is unknown; bind it first "
                                         "(plan.bind(ModelSpec...) / --model)")
            v = torch.zeros(width)
            v[e.dims] = e.b
        elif e.b.dim() == 0:
            if width is None:
                raise ControlVectorError(f"cannot export {where}: b is a scalar and the plan is not bound to a "
                                         "model, so the hidden size is unknown; bind it first")
            v = torch.full((width,), float(e.b))
        else:
            v = e.b.clone()
            if width is None:
                width = v.numel()
            elif v.numel() != width:
                raise ControlVectorError(f"cannot export {where}: b has length {v.numel()}, other entries have "
                                         f"length {width}")
        out[e.layer] = v if e.layer not in out else out[e.layer] + v
    if not out:
        raise ControlVectorError("cannot export to a GGUF control vector: the plan adds nothing to any layer "
                                 "(no entry with a non-empty b on 'layer.out')")
    return {layer: out[layer].to(torch.float32).numpy().astype(np.float32, copy=False) for layer in sorted(out)}


def write_control_vector(plan: SteeringPlan, path: str | os.PathLike, model_hint: str | None = None,
                         allow_layer0: bool = False) -> None:
    """Write a plan of pure ``layer.out`` additions as a GGUF control vector (llama.cpp / repeng readable).

    ``model_hint`` defaults to the plan's ``model_type`` (``"unknown"`` for an unbound plan). Raises
    :class:`ControlVectorError` naming the entry that cannot be expressed (other sites, gains, gating,
    layer 0 unless ``allow_layer0``). The file is written to a temporary name and renamed into place.
    """
    gguf = _gguf()

    dirs = control_vector_directions(plan, allow_layer0=allow_layer0)
    if model_hint is None:
        model_hint = plan.spec.model_type if plan.spec is not None else "unknown"
    if not isinstance(model_hint, str) or not model_hint:
        raise ControlVectorError(f"model_hint must be a non-empty string, got {model_hint!r}")
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        w = gguf.GGUFWriter(tmp, ARCH)
        w.add_string(KEY_HINT, model_hint)
        w.add_uint32(KEY_COUNT, len(dirs))
        if plan.name:
            w.add_string(KEY_FS_NAME, str(plan.name))
        if plan.spec is not None:
            w.add_string(KEY_FS_SPEC, plan.spec.fingerprint())
        for layer, v in dirs.items():
            w.add_tensor(f"direction.{layer}", np.ascontiguousarray(v, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - OSError, or the gguf writer's own errors: one message, no file left
        why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        raise ControlVectorError(f"cannot write control vector file {path!r}: {why}") from None
    finally:
        if os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass


__all__ = ["ControlVectorError", "inspect_control_vector", "read_control_vector", "read_control_vectors",
           "control_vector_directions", "write_control_vector"]
