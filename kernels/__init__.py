"""Triton kernels, installed as ``pysteer.kernels``.

Each module holds one op family's ``_name_kernel`` functions (``@triton.jit``) and the launchers that
the op table (``pysteer/ops/_registry.py: FAMILIES``) names as the ``triton`` implementations.
Nothing here is imported by ``import pysteer``: importing a module of this package imports Triton.
"""
