"""A dependency-free PNG writer and a 3x5 block font, for the demo's figure (no matplotlib needed).

:func:`write_png` stores an 8-bit grayscale (H, W) or RGB (H, W, 3) array as a PNG (PNG specification, 2nd ed.,
W3C 2003): the signature, one IHDR chunk, one IDAT chunk holding the zlib stream of the scanlines (each prefixed
with filter type 0, "None") and IEND; every chunk carries the CRC-32 of its type and data (``zlib.crc32`` is the
CRC the specification defines).  Non-interlaced, no ancillary chunks.

:func:`draw_text` paints upper-case block letters, digits and a few signs into such an array.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = ["draw_text", "encode_png", "text_width", "write_png"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPE = {2: 0, 3: 2}  # array ndim -> PNG colour type (0 grayscale, 2 truecolour RGB)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(pixels: np.ndarray) -> bytes:
    """The PNG file of ``pixels``: a uint8 array of shape (H, W) (grayscale) or (H, W, 3) (RGB)."""
    a = np.asarray(pixels)
    if a.dtype != np.uint8:
        raise TypeError(f"pixels must be a uint8 array, got dtype {a.dtype}")
    if a.ndim not in _COLOR_TYPE or (a.ndim == 3 and a.shape[2] != 3) or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"pixels must have shape (H, W) or (H, W, 3) with H, W >= 1, got {a.shape}")
    height, width = a.shape[:2]
    rows = np.ascontiguousarray(a).reshape(height, -1)
    scanlines = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1)  # filter byte 0 per row
    ihdr = struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPE[a.ndim], 0, 0, 0)  # 8-bit, no interlace
    return (PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 9))
            + _chunk(b"IEND", b""))


def write_png(path, pixels: np.ndarray) -> None:
    """Write ``pixels`` (see :func:`encode_png`) to ``path`` as a PNG file."""
    data = encode_png(pixels)
    with open(path, "wb") as fh:
        fh.write(data)


# 3x5 block glyphs: five rows top to bottom, "#" = ink.
_GLYPH_ROWS = {
    "A": ".#. #.# ### #.# #.#", "B": "##. #.# ##. #.# ##.", "C": ".## #.. #.. #.. .##", "D": "##. #.# #.# #.# ##.",
    "E": "### #.. ##. #.. ###", "F": "### #.. ##. #.. #..", "G": ".## #.. #.# #.# .##", "H": "#.# #.# ### #.# #.#",
    "I": "### .#. .#. .#. ###", "J": "..# ..# ..# #.# .#.", "K": "#.# #.# ##. #.# #.#", "L": "#.. #.. #.. #.. ###",
    "M": "#.# ### ### #.# #.#", "N": "##. #.# #.# #.# #.#", "O": ".#. #.# #.# #.# .#.", "P": "##. #.# ##. #.. #..",
    "Q": ".#. #.# #.# ##. .##", "R": "##. #.# ##. #.# #.#", "S": ".## #.. .#. ..# ##.", "T": "### .#. .#. .#. .#.",
    "U": "#.# #.# #.# #.# ###", "V": "#.# #.# #.# #.# .#.", "W": "#.# #.# ### ### #.#", "X": "#.# #.# .#. #.# #.#",
    "Y": "#.# #.# .#. .#. .#.", "Z": "### ..# .#. #.. ###",
    "0": "### #.# #.# #.# ###", "1": ".#. ##. .#. .#. ###", "2": "##. ..# .#. #.. ###", "3": "##. ..# .#. ..# ##.",
    "4": "#.# #.# ### ..# ..#", "5": "### #.. ##. ..# ##.", "6": ".## #.. ### #.# ###", "7": "### ..# .#. .#. .#.",
    "8": "### #.# ### #.# ###", "9": "### #.# ### ..# ##.",
    " ": "... ... ... ... ...", ".": "... ... ... ... .#.", ",": "... ... ... .#. #..", ":": "... .#. ... .#. ...",
    "-": "... ... ### ... ...", "+": "... .#. ### .#. ...", "=": "... ### ... ### ...", "%": "#.# ..# .#. #.. #.#",
    "(": ".#. #.. #.. #.. .#.", ")": ".#. ..# ..# ..# .#.", "/": "..# ..# .#. #.. #..", "<": "..# .#. #.. .#. ..#",
    ">": "#.. .#. ..# .#. #..", "_": "... ... ... ... ###", ";": "... .#. ... .#. #..",
    "'": ".#. .#. ... ... ...", "*": "... #.# .#. #.# ...", "!": ".#. .#. .#. ... .#.", "?": "##. ..# .#. ... .#.",
    "[": "##. #.. #.. #.. ##.", "]": ".## ..# ..# ..# .##", "#": "#.# ### #.# ### #.#",
}
_FONT = {c: np.array([[ch == "#" for ch in row] for row in rows.split()]) for c, rows in _GLYPH_ROWS.items()}
GLYPH_W, GLYPH_H = 3, 5
_SIGNS = "".join(c for c in _GLYPH_ROWS if not c.isalnum() and c != " ")


def text_width(text: str, scale: int = 2) -> int:
    """Width in pixels of ``text`` drawn by :func:`draw_text` (one blank column between glyphs)."""
    return max(0, (GLYPH_W + 1) * len(text) - 1) * scale


def draw_text(img: np.ndarray, x: int, y: int, text: str, color, scale: int = 2) -> int:
    """Paint ``text`` (upper-cased) into ``img`` with its top-left corner at (x, y); returns the x after it.

    Each glyph is 3x5 cells of ``scale`` x ``scale`` pixels; ``x, y >= 0``; ink past the right or bottom edge of
    ``img`` is clipped.
    """
    if x < 0 or y < 0:
        raise ValueError(f"draw_text needs x, y >= 0, got ({x}, {y})")
    for ch in text.upper():
        glyph = _FONT.get(ch)
        if glyph is None:
            raise ValueError(f"draw_text has no glyph for {ch!r}: it draws A-Z, 0-9, space and {_SIGNS}")
        ink = glyph.repeat(scale, 0).repeat(scale, 1)
        h = min(ink.shape[0], img.shape[0] - y)
        w = min(ink.shape[1], img.shape[1] - x)
        if h > 0 and w > 0:
            img[y:y + h, x:x + w][ink[:h, :w]] = color
        x += (GLYPH_W + 1) * scale
    return x
