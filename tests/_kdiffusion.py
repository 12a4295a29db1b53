"""The oracle: k-diffusion's own ``k_diffusion.sampling`` and ``k_diffusion.external``, unmodified.

``k_diffusion/__init__.py`` imports the whole training stack (torchvision, scikit-image, CLIP, wandb ...), and
PyPI's torchvision does not import beside the torch 2.13.0 CPU build this project tests with; the two modules the
tests use need none of it.  The library's drop-in loads exactly these two files the same way for its users
(``zsnr_kernels.k_diffusion.k_diffusion_module``), so the tests take them from there: one loader, and the code
that runs is k-diffusion's (``k-diffusion`` is installed with ``--no-deps``; see the README's test command).
"""

from __future__ import annotations


def load():
    """Return ``(sampling, external)``, the k-diffusion modules, loaded once per process."""
    import importlib.util
    import os

    from zsnr_kernels.k_diffusion import k_diffusion_module

    mods = k_diffusion_module("sampling"), k_diffusion_module("external")
    root = os.path.dirname(importlib.util.find_spec("k_diffusion.sampling").origin)
    for m in mods:  # k-diffusion's own files, not a stand-in of this library's
        assert os.path.dirname(os.path.abspath(m.__file__)) == os.path.abspath(root), m.__file__
    return mods
