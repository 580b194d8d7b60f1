"""fusesteer: a fused-kernel steering runtime for HF causal LMs.

    import fusesteer as fs
    model, tok = fs.models.load("smollm2-135m")
    plan = fs.SteeringPlan.for_model(model)
    plan.add(layer=3, site="layer.out", b=vec)
    with fs.attach(model, plan, backend="torch"):
        out = model.generate(**inputs)
"""

from .errors import AttachError, ContractError, FuseSteerError, ModelLoadError, NonFiniteActivationError, PlanError
from .runtime.attach import BACKENDS, SteeringHandle, attach
from .runtime.families import model_sites
from .runtime.plan import GATINGS, SITES, ModelSpec, PlanEntry, SteeringPlan
from .runtime.support import supported_models

__version__ = "0.1.0"


def __getattr__(name):  # lazy submodules: fs.models, fs.methods, ...
    import importlib

    if name in ("models", "methods", "evaluate", "interop", "kernels", "cli", "testing"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fusesteer' has no attribute {name!r}")


__all__ = [
    "AttachError", "ContractError", "FuseSteerError", "ModelLoadError", "NonFiniteActivationError", "PlanError",
    "BACKENDS", "SteeringHandle", "attach", "model_sites", "supported_models", "GATINGS", "SITES", "ModelSpec",
    "PlanEntry", "SteeringPlan",
]
