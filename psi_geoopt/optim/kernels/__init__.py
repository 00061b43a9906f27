"""The compiled backends of the fused PSI step: :mod:`.numba` (CPU) and :mod:`.triton` (CUDA)."""
