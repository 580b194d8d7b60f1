"""Optional dependencies: import one, or say which extra installs it."""

from __future__ import annotations

import importlib

from .errors import FuseSteerError


class MissingExtraError(FuseSteerError, ImportError):
    """An optional dependency of the feature asked for is not installed."""


def require(module: str, extra: str, feature: str):
    """Import ``module`` or raise MissingExtraError naming the pip extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(f"{feature} needs the package {module.split('.')[0]!r} ({e}); install it with: "
                                f"pip install 'fusesteer[{extra}]'") from None
