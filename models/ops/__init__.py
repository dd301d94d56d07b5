"""Recurrence kernels, each beside its reference (STYLE section 5).

`forget_mult` (QRNN's ForgetMult) runs Triton kernels on CUDA and a fast PyTorch loop elsewhere;
`forget_mult_ref` is its specification. Importing this package never imports Triton.
"""

from models.ops.forget_mult import forget_mult, forget_mult_ref, forget_mult_torch

__all__ = ["forget_mult", "forget_mult_ref", "forget_mult_torch"]
