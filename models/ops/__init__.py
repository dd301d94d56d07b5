"""Recurrence kernels, each beside its reference (STYLE section 5).

`models.ops.forget_mult` holds QRNN's ForgetMult: `forget_mult_ref` (the specification),
`forget_mult_torch` (a fast PyTorch path, any device) and `forget_mult` (Triton kernels on CUDA,
the PyTorch path elsewhere). The functions are imported from their module
(`from models.ops.forget_mult import forget_mult`): re-exporting `forget_mult` here would shadow the
module of the same name. Importing this package never imports Triton.
"""
