"""Triton kernels, installed as ``pysteer.kernels``.

Each module holds one op family's ``_name_kernel`` functions (``@triton.jit``) and the launchers that
the op table (``pysteer/ops/_registry.py: FAMILIES``) names as the ``triton`` implementations;
``_common.py`` holds what more than one family uses (exact bf16 widening and rounding, the launch
device). Nothing here is imported by ``import pysteer``: importing a module of this package imports Triton.
"""
