"""Exceptions raised by fusesteer. Every user-facing error is a subclass of FuseSteerError."""


class FuseSteerError(Exception):
    """Base class for fusesteer errors."""


class PlanError(FuseSteerError, ValueError):
    """A steering plan is malformed, does not fit the model, or a plan file cannot be trusted."""


class AttachError(FuseSteerError, RuntimeError):
    """Attaching/detaching a plan to a model failed (unsupported model, bad routing, nesting...)."""


class ContractError(AttachError):
    """A patched layer forward does not reproduce the HF layer it replaces (checked at attach)."""


class ModelLoadError(FuseSteerError, RuntimeError):
    """An embedded model could not be located or converted."""


class NonFiniteActivationError(FuseSteerError, FloatingPointError):
    """A steering map produced NaN/Inf activations (see attach(..., check_finite=...))."""


class KernelInputError(FuseSteerError, ValueError):
    """A fused-kernel op got inputs of the wrong shape, dtype or device, or a bad slot index."""


class KernelUnavailableError(FuseSteerError, RuntimeError):
    """The Triton path was forced but cannot run here (no Triton, or CPU without interpreter)."""
