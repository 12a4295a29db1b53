"""How the k-diffusion drop-in reaches k-diffusion's own modules in the README's environment (k-diffusion installed
with ``--no-deps``, so ``import k_diffusion`` fails on its training stack), and what it says when it cannot."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest



def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)


def _k_diffusion_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("k_diffusion") is not None


needs_k_diffusion = pytest.mark.skipif(not _k_diffusion_installed(), reason="k-diffusion is not installed")


@needs_k_diffusion
def test_external_and_forwarded_samplers_load_without_the_training_stack():
    """``K.external`` and k-diffusion's own samplers load although the package's ``__init__`` cannot (as here,
    where torchvision and scikit-image are absent), from k-diffusion's unmodified files; the two modules are then
    importable under their own names."""
    run = _run("""
        import importlib, sys
        from zsnr_kernels import k_diffusion as K
        try:
            importlib.import_module("k_diffusion")
            full = True
        except Exception:
            full = False
        ext = K.external
        assert ext.DiscreteVDDPMDenoiser.__module__ == "k_diffusion.external"
        assert K.sample_dpm_fast.__module__ == "k_diffusion.sampling"      # forwarded: k-diffusion's own
        assert K.sample_dpmpp_sde.__module__ == "zsnr_kernels.k_diffusion"  # rewritten on the fused steps
        import k_diffusion.external
        assert k_diffusion.external is ext
        print("full" if full else "bare")
    """)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() in ("full", "bare")


@needs_k_diffusion
def test_a_missing_dependency_is_named_with_the_install_command():
    run = _run("""
        import sys
        sys.modules["torchsde"] = None          # as if torchsde were not installed
        from zsnr_kernels import k_diffusion as K
        try:
            K.external
        except AttributeError as exc:
            print(exc)
        else:
            raise SystemExit("no error")
        assert "k_diffusion.external" not in sys.modules and "k_diffusion" not in sys.modules  # nothing half-loaded
    """)
    assert run.returncode == 0, run.stderr + run.stdout
    from zsnr_kernels.k_diffusion import K_DIFFUSION_INSTALL

    assert "install 'torchsde'" in run.stdout and K_DIFFUSION_INSTALL in run.stdout


def test_k_diffusion_not_installed_is_named_with_the_install_command():
    run = _run("""
        import sys
        sys.modules["k_diffusion"] = None       # as if k-diffusion were not installed
        from zsnr_kernels import k_diffusion as K
        try:
            K.external
        except AttributeError as exc:
            print(exc)
    """)
    assert run.returncode == 0, run.stderr
    assert "k-diffusion is not installed" in run.stdout and "--no-deps k-diffusion==0.1.1.post1" in run.stdout


def test_the_extra_lists_what_sampling_and_external_import():
    """The ``k-diffusion`` extra names every third-party module k-diffusion's sampling.py and external.py import
    (torch aside, which the package itself requires)."""
    import pathlib
    import re

    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11's")

    root = pathlib.Path(__file__).resolve().parents[2]
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["k-diffusion"]
    names = {re.split(r"[<>=!~ \[]", r)[0].lower() for r in extra}
    assert names >= {"scipy", "torchsde", "torchdiffeq", "tqdm"}
    from zsnr_kernels.k_diffusion import K_DIFFUSION_INSTALL

    assert K_DIFFUSION_INSTALL.startswith(f"pip install {' '.join(re.split(r'[<>=!~ ]', r)[0] for r in extra)} && ")
    if _k_diffusion_installed():
        import importlib.util

        loc = list(importlib.util.find_spec("k_diffusion").submodule_search_locations)[0]
        imported = set()
        for part in ("sampling", "external"):
            text = pathlib.Path(loc, f"{part}.py").read_text()
            imported |= {m.split(".")[0] for m in re.findall(r"^(?:from|import) ([\w.]+)", text, re.M)}
        third_party = imported - {"math", "torch", "__future__", "functools", "warnings"} - {""}
        assert third_party <= names, third_party - names


@needs_k_diffusion
def test_threads_loading_at_once_get_the_complete_modules():
    """The modules enter sys.modules before their code has run: without the loader's lock a second thread got a
    half-loaded ``sampling`` (no ``sample_dpmpp_sde`` yet) or an ``external`` other than the registered one."""
    run = _run("""
        import sys, threading
        from zsnr_kernels import k_diffusion as K
        seen, start = [], threading.Barrier(8)
        def load():
            start.wait()
            sampling = K.k_diffusion_module("sampling")
            seen.append((hasattr(sampling, "sample_dpmpp_sde"), K.k_diffusion_module("external")))
        threads = [threading.Thread(target=load) for _ in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert all(ok for ok, _ in seen) and all(e is sys.modules["k_diffusion.external"] for _, e in seen), seen
    """)
    assert run.returncode == 0, run.stderr
