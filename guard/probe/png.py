"""Score histograms as PNG images, without a plotting library.

:func:`encode_png` is a minimal PNG encoder (8-bit greyscale or RGB, no interlace, one zlib IDAT,
filter type 0 on every scanline). :func:`histogram_image` draws one histogram per class into a
numpy ``uint8`` image: per bin, the class-0 bar in the left half and the class-1 bar in the right
half, heights as the fraction of the class's rows in the bin (so classes of different sizes
compare), plus a vertical threshold line. No text: the CLI prints the numbers.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NEG_COLOUR = (54, 112, 196)
"""Class 0 (negatives): blue."""
POS_COLOUR = (222, 120, 40)
"""Class 1 (positives): orange."""
THRESHOLD_COLOUR = (200, 30, 30)
AXIS_COLOUR = (60, 60, 60)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a ``uint8`` image ``[h, w]`` (greyscale) or ``[h, w, 3]`` (RGB)."""
    image = np.asarray(image)
    if (
        image.dtype != np.uint8
        or image.ndim not in (2, 3)
        or (image.ndim == 3 and image.shape[2] != 3)
    ):
        raise ValueError(
            f"expected a uint8 [h, w] or [h, w, 3] image, got {image.dtype} {image.shape}"
        )
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise ValueError("an image needs at least one pixel")
    colour_type = 0 if image.ndim == 2 else 2
    rows = image.reshape(h, -1)
    raw = np.concatenate(
        [np.zeros((h, 1), np.uint8), rows], axis=1
    ).tobytes()  # filter byte 0 per row
    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw, 9))
        + _chunk(b"IEND", b"")
    )


def write_png(path: str | Path, image: np.ndarray) -> Path:
    path = Path(path)
    path.write_bytes(encode_png(image))
    return path


def histogram_image(
    scores,
    labels,
    threshold: float | None = None,
    *,
    bins: int = 40,
    lo: float | None = None,
    hi: float | None = None,
    width: int = 640,
    height: int = 320,
    margin: int = 16,
) -> np.ndarray:
    """``[height, width, 3]`` image of the score histogram of each class (see the module docstring).

    The range defaults to ``[0, 1]`` when every score (and the threshold) lies in it, else to the
    data's range.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    finite = scores[np.isfinite(scores)]
    pts = np.concatenate([finite, [threshold] if threshold is not None else []])
    if lo is None or hi is None:
        in_unit = len(pts) == 0 or (pts.min() >= 0.0 and pts.max() <= 1.0)
        lo = lo if lo is not None else (0.0 if in_unit else float(pts.min()))
        hi = hi if hi is not None else (1.0 if in_unit else float(pts.max()))
    if hi <= lo:
        hi = lo + 1.0
    img = np.full((height, width, 3), 255, np.uint8)
    plot_w, plot_h = width - 2 * margin, height - 2 * margin
    edges = np.linspace(lo, hi, bins + 1)
    bin_px = plot_w / bins
    fracs = []
    for cls in (False, True):
        s = np.clip(scores[(labels == cls) & np.isfinite(scores)], lo, hi)
        counts, _ = np.histogram(s, bins=edges)
        fracs.append(counts / max(1, counts.sum()))
    top = max(*(f.max() for f in fracs), 1e-12)
    base = height - margin
    for b in range(bins):
        x0 = margin + int(round(b * bin_px))
        x1 = margin + int(round((b + 1) * bin_px))
        mid = (x0 + x1) // 2
        for (a, z), frac, colour in zip(
            ((x0, mid), (mid, x1)), fracs, (NEG_COLOUR, POS_COLOUR), strict=True
        ):
            bar = int(round(frac[b] / top * plot_h))
            if bar > 0 and z > a:
                img[base - bar : base, a : max(a + 1, z - 1)] = colour
    img[base : base + 1, margin : width - margin] = AXIS_COLOUR
    img[margin:base, margin : margin + 1] = AXIS_COLOUR
    if threshold is not None and lo <= threshold <= hi:
        x = margin + int(round((threshold - lo) / (hi - lo) * (plot_w - 1)))
        img[margin:base, max(0, x - 1) : x + 1] = THRESHOLD_COLOUR
    return img
