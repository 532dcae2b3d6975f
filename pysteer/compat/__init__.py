"""Conversions between pysteer and the steering libraries and formats people already use.

- ``pysteer.compat.llamacpp``: llama.cpp control vectors (GGUF), read and written; repeng's
  ``ControlVector.export_gguf`` writes the same format.
- ``pysteer.compat.repeng``: a repeng ``ControlVector`` and coefficient as interventions.
- ``pysteer.compat.steering_vectors``: a steering-vectors ``SteeringVector`` (layer type, multiplier,
  token indices) as a ``SteeringSpec``.
- ``pysteer.compat.pyreft``: LoReFT interventions saved by pyreft (``ReftModel.save``) as
  ``pysteer.LoReFT``.

The libraries themselves are not imported (several pin ``transformers<5``): their objects are read
by the attributes they document, their files by their documented layout, never by untrusted pickle.
"""
