"""Command line: ``python -m zsnr_kernels {demo,info}`` (also installed as ``zsnr-kernels``)."""

from __future__ import annotations

import argparse
import json
import platform
import sys


def info() -> int:
    """Print versions, the compiled module's build, and which backends can run steps (and why not)."""
    import torch

    from . import __version__, _backend, _ext

    print(f"zsnr-kernels {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print(f"compiled module zsnr_kernels._C: {'loaded' if _ext.available() else 'unavailable'}")
    if _ext.available():
        print("  build: " + json.dumps(_ext.build_info(), sort_keys=True))
        print(f"  cpu kernels use: {_ext.C.cpu_isa()}")
    else:
        print(f"  why: {_ext.why_unavailable()}")
    probe = torch.zeros(1)
    print("backends for CPU tensors:")
    for name in _backend.BACKENDS[1:]:
        reasons = _backend.not_supported_reasons(name, probe)
        print(f"  {name:7s} {'available' if not reasons else 'unavailable: ' + '; '.join(reasons)}")
    print(f"  auto -> {_backend.resolve('auto', probe)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zsnr-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, build and backend availability")
    demo = sub.add_parser("demo", help="sample exact denoisers from sigma = inf and print what was measured",
                          add_help=False)
    demo.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    if ns.command == "info":
        return info()
    from . import demo as demo_module

    return demo_module.main(ns.args) or 0


if __name__ == "__main__":
    sys.exit(main())
