"""The Triton mirror of the zsnr kernels, beside the backend that launches them (:mod:`zsnr_kernels.backends.triton`);
never a top-level ``triton_kernels``, which would collide with Triton's own package of that name."""
