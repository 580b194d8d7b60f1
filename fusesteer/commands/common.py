"""What several verbs share: loading a model (timed, with a first-conversion notice) and saying warnings."""

from __future__ import annotations

import sys
import time


def warn(message: str) -> None:
    """One warning line on stderr (shown even under --quiet: it is about the result, not progress)."""
    print(f"fusesteer: warning: {message}", file=sys.stderr, flush=True)


def load_model(name: str, *, threads: int | None = None, quiet: bool = False, quantization: str | None = None):
    """``(model, tokenizer, load_seconds)``.

    An embedded model (:data:`fusesteer.models.KNOWN`) without a converted cache is converted from its GGUF
    first, once, which takes minutes; under ``quiet`` (no progress bars) one line still says so, and the
    model-load time is returned apart so that callers report it apart from their own work.
    """
    import torch

    from .. import models

    if threads:
        torch.set_num_threads(threads)
    known = isinstance(name, str) and name in models.KNOWN
    before = models.cache_marker(name) if known else None
    if known and before is None and quiet:
        print(f"fusesteer: first use of {name}: converting its GGUF once into {models.cache_path(name)} "
              f"(minutes; later loads read the cache)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    model, tok = models.load(name, quantization=quantization, progress=not quiet)
    secs = time.perf_counter() - t0
    if known and before is not None and quiet and models.cache_marker(name) != before:
        print(f"fusesteer: the cache of {name} was stale and has been converted again ({secs:.0f} s)",
              file=sys.stderr, flush=True)
    return model, tok, secs
