"""pysteer: fast hooked inference for Hugging Face causal LMs.

Steering (per-head bias injection, activation scaling, SAE feature edits, low-rank edits) inside
``generate()`` with the KV cache, activation tracing to disk, and the research recipes built on them.

``import pysteer`` is lean: it never initialises CUDA and imports neither Triton nor the CUDA
extension; heavier submodules load on first use.
"""

from __future__ import annotations

from . import ops  # registers the torch.library ops (cheap; no CUDA, no Triton)
from ._backend import BackendUnavailable, backend_status, resolve_backend
from ._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> submodule that defines it (loaded on first access)
_LAZY = {
    "steer": "pysteer.steering",
    "SteeringHandle": "pysteer.steering",
    "HeadBias": "pysteer.interventions",
    "HeadScale": "pysteer.interventions",
    "VectorAdd": "pysteer.interventions",
    "VectorScale": "pysteer.interventions",
    "save": "pysteer.io",
    "load": "pysteer.io",
    "directions": "pysteer.directions",
    "SAE": "pysteer.sae",
    "SAEEdit": "pysteer.sae_steering",
    "ActivScalar": "pysteer.scalars",
    "SteerVec": "pysteer.scalars",
    "DynScalar": "pysteer.scalars",
    "Patch": "pysteer.patching",
    "Noise": "pysteer.patching",
    "LoReFT": "pysteer.reft",
    "FrozenPrefix": "pysteer.prefix_cache",
    "WeightDelta": "pysteer.weight_delta",
    "intervention_kind": "pysteer.interventions",
    "runtime": "pysteer.steering",
    "trace": "pysteer.tracing",
    "trace_dataset": "pysteer.tracing",
    "TraceReader": "pysteer.tracing",
    "generate": "pysteer.fast",
    "recipes": "pysteer.recipes",
    "models": "pysteer.models",
    "train_sae": "pysteer.sae_train",
    "SAETrainConfig": "pysteer.sae_train",
    "uncertainty": "pysteer.uncertainty",
}


__getattr__, __dir__ = lazy_exports("pysteer", globals(), _LAZY)


__all__ = ["BackendUnavailable", "backend_status", "resolve_backend", "ops", *_LAZY]
