"""Conversions between pysteer and the steering libraries and formats people already use.

- ``pysteer.compat.llamacpp``: llama.cpp control vectors (GGUF), read and written; repeng's
  ``ControlVector.export_gguf`` writes the same format.
"""
