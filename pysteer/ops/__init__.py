"""Ops: each family is declared once with ``torch.library`` and implemented per backend.

Where every part of every op lives is the table ``_registry.FAMILIES``.
"""

from . import sae  # registers the pysteer::sae_* ops (no Triton, no CUDA)
from .affine import affine_steer, affine_steer_ref, check_affine_args
from .affine_linear import affine_linear, affine_linear_ref, check_affine_linear_args
from .lowrank import check_lowrank_args, lowrank_edit, lowrank_edit_ref

__all__ = [
    "affine_linear",
    "affine_linear_ref",
    "affine_steer",
    "affine_steer_ref",
    "check_affine_args",
    "check_affine_linear_args",
    "check_lowrank_args",
    "lowrank_edit",
    "lowrank_edit_ref",
    "sae",
]
