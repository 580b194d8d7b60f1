"""The Triton interpreter for the CPU parity rows of the ``triton`` backend.

Importing this module (every suite does, through :mod:`fusesteer.bench.common`) turns the interpreter on
(``TRITON_INTERPRET=1``) on a machine without CUDA, unless the variable is already set or Triton is already
imported: Triton's own library functions (``tl.sum`` ...) are built at Triton's import under the setting of that
moment, so the interpreter must be on before the first ``import triton``. The package ``fusesteer.bench`` and
its option parser do not import this module, so building the `fusesteer` command line changes nothing for the
other verbs.
"""

from __future__ import annotations

import os
import sys


def _enable_interpreter_on_cpu() -> bool:
    if "TRITON_INTERPRET" in os.environ:
        return os.environ["TRITON_INTERPRET"] not in ("", "0")
    if "triton" in sys.modules:
        return False
    import torch

    if torch.cuda.is_available():
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True


#: True when the Triton interpreter was on before Triton was imported (CPU parity of the triton backend).
INTERPRETER_AT_IMPORT = _enable_interpreter_on_cpu()
