"""Op registry: every op is declared once with ``torch.library`` and implemented per backend."""

from .affine import affine_steer, affine_steer_ref, check_affine_args

__all__ = ["affine_steer", "affine_steer_ref", "check_affine_args"]
