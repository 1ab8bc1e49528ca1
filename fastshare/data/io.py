"""File reading for the on-disk data sets, with errors that name the file.

Every reader raises :class:`DataFileError` (a subclass of ``OSError``) for a missing, unreadable, truncated
or malformed file; the message holds the full path and the underlying reason. OpenCV is not a dependency:
images are decoded with Pillow, arrays with numpy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

PathLike = str | os.PathLike[str]


class DataFileError(OSError):
    """A data file is missing, truncated or not in the expected format; ``path`` names it."""

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {reason}")


def _open_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise DataFileError(path, "no such file")
    try:
        img = Image.open(path)
        img.load()  # Image.open only reads the header; load() decodes and catches truncation
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataFileError(path, f"cannot decode image ({type(exc).__name__}: {exc})") from exc
    return img


def read_color_image(path: PathLike, *, three_channel: bool = False) -> np.ndarray:
    """Read an 8-bit colour image as ``(H, W, 3)`` uint8 in **RGB** order (Pillow's order).

    A grey or palette image is converted to RGB, unless ``three_channel`` (maps whose channels are data,
    such as surface normals: a grey map holds no vectors): then only an RGB(A) file is accepted.
    """
    img = _open_image(Path(path))
    modes = ("RGB", "RGBA") if three_channel else ("RGB", "RGBA", "L", "P")
    if img.mode not in modes:
        kind = "a 3-channel 8-bit RGB image" if three_channel else "an 8-bit colour image"
        raise DataFileError(path, f"expected {kind}, got Pillow mode {img.mode!r}")
    return np.asarray(img.convert("RGB"))


def read_label_image(path: PathLike) -> np.ndarray:
    """Read a single-channel label image as ``(H, W)`` with its stored integer values (8 or 16 bit).

    Palette images return their indices, not colours; a colour image is an error (converting it to grey
    would silently change the labels).
    """
    img = _open_image(Path(path))
    if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise DataFileError(path, f"expected a single-channel label image, got Pillow mode {img.mode!r}")
    return np.asarray(img)


def read_npy(path: PathLike, *, ndim: tuple[int, ...] | None = None) -> np.ndarray:
    """Load a ``.npy`` array (no pickles); with ``ndim``, require one of those numbers of dimensions."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(path, "no such file")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise DataFileError(path, f"cannot read .npy array ({type(exc).__name__}: {exc})") from exc
    if not isinstance(arr, np.ndarray):
        raise DataFileError(path, f"expected a single array, got {type(arr).__name__}")
    if ndim is not None and arr.ndim not in ndim:
        dims = " or ".join(map(str, ndim))
        raise DataFileError(path, f"expected an array with {dims} dimensions, got shape {arr.shape}")
    return arr


def check_numeric(path: PathLike, arr: np.ndarray, *, floating: bool = False) -> None:
    """Require finite numbers: integers or floating point (only floating point with ``floating``); a
    bool, complex or text array, or a NaN or infinite value, is a :class:`DataFileError` naming ``path``."""
    kinds, expected = ("f", "floating-point") if floating else ("iuf", "integer or floating-point")
    if arr.dtype.kind not in kinds:
        raise DataFileError(path, f"expected {expected} values, got dtype {arr.dtype}")
    if arr.dtype.kind != "f":  # integers are always finite; skip the scan (it runs per label map)
        return
    non_finite = arr.size - int(np.isfinite(arr).sum())
    if non_finite:
        raise DataFileError(path, f"{non_finite} value(s) are NaN or infinite")


def read_depth_npy(path: PathLike) -> np.ndarray:
    """Load a depth map ``.npy``, ``(H, W)`` or ``(H, W, 1)``, as float32 ``(H, W)``.

    The values must be floating point, finite and >= 0 (0 marks an invalid pixel); anything else is a
    :class:`DataFileError` naming the file.
    """
    depth = read_npy(path, ndim=(2, 3))
    if depth.ndim == 3:
        if depth.shape[2] != 1:
            raise DataFileError(path, f"expected (H, W) or (H, W, 1) depth, got shape {depth.shape}")
        depth = depth[:, :, 0]
    check_numeric(path, depth, floating=True)
    if (depth < 0).any():
        raise DataFileError(path, f"depth must be >= 0 (0 = invalid), found {float(depth.min())}")
    return depth.astype(np.float32)


def read_split_file(root: PathLike, name: str, split: str) -> list[list[str]]:
    """Read ``root/name`` (a JSON object mapping split names to lists of relative-path groups).

    Returns the groups of ``split``; raises :class:`DataFileError` if the file is missing or malformed or
    ``split`` has no samples, and ``KeyError`` naming the available splits if ``split`` is absent.
    """
    path = Path(root) / name
    if not path.is_file():
        raise DataFileError(path, "no such split file")
    try:
        with open(path, encoding="utf-8") as fh:
            info: Any = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFileError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(info, dict):
        raise DataFileError(path, "expected a JSON object mapping split names to lists of paths")
    if split not in info:
        raise KeyError(f"split {split!r} not in {path}; available: {sorted(info)}")
    groups = info[split]
    well_formed = isinstance(groups, list) and all(
        isinstance(g, list) and all(isinstance(p, str) for p in g) for g in groups
    )
    if not well_formed:
        raise DataFileError(path, f"split {split!r} must be a list of lists of path strings")
    if not groups:  # a run would fail only at its end, when it first evaluates the split
        raise DataFileError(path, f"split {split!r} has no samples")
    return groups
