"""The bench's usage error (a :class:`fusesteer.errors.FuseSteerError`: the command line prints it and exits 2)."""

from __future__ import annotations

from ..errors import FuseSteerError


class BenchError(FuseSteerError):
    """The bench was asked for something it cannot do (bad option, missing model, unusable output folder...)."""
