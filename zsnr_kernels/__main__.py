"""Command line: ``python -m zsnr_kernels {info,demo,bench,selftest,bench-compare,comfyui-install}`` (also installed
as ``zsnr-kernels``)."""

from __future__ import annotations

import argparse
import json
import platform
import sys


def info() -> int:
    """Print versions, the compiled modules' builds, and which backends can run steps on CPU and CUDA tensors (and
    why not)."""
    import torch

    from .backends import cuda as _cuda, ext as _ext, registry as _backend, triton as _triton
    from ._version import __version__

    print(f"zsnr-kernels {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print(f"compiled module zsnr_kernels._C: {'loaded' if _ext.available() else 'unavailable'}")
    if _ext.available():
        print("  build: " + json.dumps(_ext.build_info(), sort_keys=True))
        print(f"  cpu kernels use: {_ext.C.cpu_isa()}")
    else:
        print(f"  why: {_ext.why_unavailable()}")
    cuda_info = _cuda.build_info()
    print(f"compiled module zsnr_kernels._C_cuda: {'loaded' if cuda_info is not None else 'unavailable'}")
    if cuda_info is not None:
        print("  " + json.dumps(cuda_info, sort_keys=True))
    why_triton = _triton.why_unavailable()
    if why_triton is None:
        import triton

        print(f"triton {triton.__version__}" + (" (TRITON_INTERPRET=1: kernels run in the interpreter)"
                                                 if _triton.interpreted() else ""))
    else:
        print(f"triton: {why_triton}")
    cuda_ok = torch.cuda.is_available()
    print("torch.cuda: " + (f"{torch.cuda.device_count()} device(s), {torch.cuda.get_device_name()}" if cuda_ok
                            else "no CUDA device visible to this PyTorch build"))
    probes = [("CPU", torch.zeros(1))] + ([("CUDA", torch.zeros(1, device="cuda"))] if cuda_ok else [])
    for where, probe in probes:
        print(f"backends for {where} tensors:")
        for b in _backend.REGISTRY:
            reasons = _backend.not_supported_reasons(b.name, probe)
            print(f"  {b.name:7s} {'available' if not reasons else 'unavailable: ' + '; '.join(reasons)}")
        print(f"  auto -> {_backend.resolve('auto', probe)}")
    return 0


def parser() -> argparse.ArgumentParser:
    """The command line's parser (``bench/gpu_acceptance.sh --dry-run`` parses the commands it would run with it)."""
    from . import comfyui
    from ._version import __version__
    from .tools import bench, bench_compare, demo, selftest

    ap = argparse.ArgumentParser(prog="zsnr-kernels", description=__doc__)
    ap.add_argument("--version", action="version", version=f"zsnr-kernels {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, build and backend availability")
    for name, module, what in (
            ("demo", demo, "sample exact denoisers from sigma = inf and print what was measured"),
            ("bench", bench, "time the fused steps against eager PyTorch and torch.compile (CSV, PNG)"),
            ("selftest", selftest, "every backend that runs here against the float64 reference; exit status 1 on "
                                   "any miss"),
            ("bench-compare", bench_compare, "compare pytest-benchmark runs of bench/bench_step.py with a baseline "
                                             "on x_roof_min; exit status 1 on a regression"),
            ("comfyui-install", comfyui, "write the ZSNR nodes' shim into a ComfyUI's custom_nodes/")):
        module.add_arguments(sub.add_parser(name, help=what, description=module.__doc__.split("\n\n")[0]))
    return ap


def main(argv: list[str] | None = None) -> int:
    from . import comfyui
    from .tools import bench, bench_compare, demo, selftest

    ns = parser().parse_args(argv)
    if ns.command == "info":
        return info()
    if ns.command == "bench":
        bench.run(ns)
        return 0
    run = {"demo": demo.run, "selftest": selftest.run, "bench-compare": bench_compare.run,
           "comfyui-install": comfyui.run}[ns.command]
    return run(ns)


if __name__ == "__main__":
    sys.exit(main())
