"""Conversions between pysteer and the steering libraries and formats people already use.

- ``pysteer.compat.llamacpp``: llama.cpp control vectors (GGUF), read and written; repeng's
  ``ControlVector.export_gguf`` writes the same format.
- ``pysteer.compat.repeng``: a repeng ``ControlVector`` and coefficient as interventions.
- ``pysteer.compat.steering_vectors``: a steering-vectors ``SteeringVector`` (layer type, multiplier,
  token indices) as a ``SteeringSpec``.
- ``pysteer.compat.pyreft``: LoReFT interventions saved by pyreft (``ReftModel.save``) as
  ``pysteer.LoReFT``.
- ``pysteer.compat.iti``: ITI head directions as honest_llama stores them (its interventions dict,
  the pyvene version's per-layer displacement) as ``HeadBias`` at ``attn.heads`` with ITI's positions.

The libraries themselves are not imported (several pin ``transformers<5``): their objects are read
by the attributes they document, their files by their documented layout, never by untrusted pickle.

In place, ``pysteer.compat.accelerate("repeng" | "steering_vectors")`` (``pysteer.compat.inplace``)
makes those libraries' own calls steer through pysteer; the library is imported only then.
``accelerate("pyvene" | "pyreft")`` does the same for ``IntervenableModel.forward`` / ``generate``
(``pysteer.compat.pyvene``).
"""

from .._lazy import lazy_exports

_LAZY = {  # public name -> submodule (loaded on first use: it imports torch)
    "accelerate": "pysteer.compat.inplace",
    "Acceleration": "pysteer.compat.inplace",
    "AccelerationFallback": "pysteer.compat.inplace",
    "UnknownLibraryVersion": "pysteer.compat.inplace",
}


__getattr__, __dir__ = lazy_exports("pysteer.compat", globals(), _LAZY)
