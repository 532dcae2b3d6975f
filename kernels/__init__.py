"""Triton kernels, installed as ``pysteer.kernels``.

Each module holds one op family's ``_name_kernel`` functions (``@triton.jit``) and the launchers that
``pysteer.ops._registry.get_impl(family, name, "triton")`` looks up. Nothing here is imported by
``import pysteer``: importing a module of this package imports Triton.
"""
