"""Triton mirror of the zsnr kernels, installed as ``zsnr_kernels.triton_kernels`` (never top-level)."""
