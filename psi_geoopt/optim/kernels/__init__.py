"""The backends of the fused PSI step, each running the closed forms of
:mod:`psi_geoopt.optim._closed_form`: :mod:`.eager` (NumPy and PyTorch operations),
:mod:`.compiled` (:func:`torch.compile`), :mod:`.numba` (a compiled loop, CPU) and
:mod:`.triton` (a multi-tensor kernel, CUDA)."""
