"""Option types shared by the command line's subcommands (``python -m zsnr_kernels demo`` / ``bench`` /
``selftest``): a bad value is an argparse error (exit status 2, one line naming the option) before any work, not a
traceback after it."""

from __future__ import annotations

import argparse
import os


def output_path(path: str) -> str:
    """A file the run can write at its end: its directory exists and is writable, and it is not a directory."""
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path!r} is a directory; give a file path")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"the directory of {path!r} does not exist")
    if not os.access(directory, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{path!r} is not writable")
    return path


def seed64(text: str) -> int:
    """A seed torch.Generator.manual_seed takes: an int in [0, 2**64)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 2**64)")
    return value
