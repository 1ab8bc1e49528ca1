"""Augmentation and normalisation shared by every data set (AdaShare's pipeline, without OpenCV).

AdaShare's training augmentation, applied jointly to an image and all its label maps:

1. random scale ``s ~ U(0.5, 1.5)``: new size ``(int(H*s), int(W*s))``; bilinear for the image, nearest
   neighbour for every label map;
2. horizontal flip with probability 1/2;
3. zero-pad to at least ``(crop_h, crop_w)``, the original centred (labels are padded with their
   "ignore" value);
4. random crop of ``(crop_h, crop_w)``.

Mean subtraction happens after the crop, so padded image pixels are ``0 - mean`` as in AdaShare.
Resizing uses ``torch.nn.functional.interpolate``: ``bilinear`` with ``align_corners=False`` samples at the
same half-pixel centres as OpenCV's ``INTER_LINEAR``, and ``nearest`` picks ``floor(dst * in / out)`` as
OpenCV's ``INTER_NEAREST`` does. One difference: AdaShare resizes 8-bit images and so rounds to integers;
here the image stays float.

Randomness comes from ``generator`` (a ``torch.Generator``) or torch's global generator, which
``DataLoader`` seeds per worker.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

#: AdaShare's image mean, in BGR order, on the 0..255 scale.
IMG_MEAN_BGR: tuple[float, float, float] = (104.00698793, 116.66876762, 122.67891434)

#: Splits that get training augmentation by default (as in AdaShare).
TRAIN_SPLITS: frozenset[str] = frozenset({"train", "train1", "train2"})

IGNORE_INDEX = 255


def rgb_to_bgr_tensor(rgb: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` RGB array (any real dtype, 0..255 scale) -> ``(3, H, W)`` float32 tensor in BGR order."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {rgb.shape}")
    bgr = np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1), dtype=np.float32)
    return torch.from_numpy(bgr)


def subtract_mean(img_bgr: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` BGR image on the 0..255 scale -> the same minus :data:`IMG_MEAN_BGR` (float32)."""
    mean = torch.tensor(IMG_MEAN_BGR, dtype=torch.float32).view(3, 1, 1)
    return img_bgr.float() - mean


def unit_normals(vectors: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Normalise ``(3, H, W)`` vectors to unit length where ``valid`` ``(H, W)``; exactly 0 elsewhere.

    Pixels whose vector has zero length are also set to 0 (the "invalid normal" marker).
    """
    # The norm in float64: torch 2.13's CPU build here computed float32 sqrt(1) as 1 - 2**-12 (an unrefined
    # rsqrt estimate) in about one process in 40, which broke the unit-length contract (tests/test_data.py).
    v = vectors.double()
    norm = (v * v).sum(dim=0, keepdim=True).sqrt()
    ok = valid.unsqueeze(0) & (norm > 0)
    return torch.where(ok, v / norm.clamp_min(1e-12), 0.0).float()


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _randint(high_inclusive: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(0, high_inclusive + 1, (), generator=generator))


def resize(t: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize a ``(C, H, W)`` tensor to ``size = (h, w)`` with ``'bilinear'`` or ``'nearest'`` (OpenCV-like).

    Returns a ``(C, h, w)`` tensor of the input's dtype (integer maps must use ``'nearest'``).
    """
    x = t.unsqueeze(0).to(torch.float32)
    if mode == "bilinear":
        y = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    elif mode == "nearest":
        y = F.interpolate(x, size=size, mode="nearest")
    else:
        raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {mode!r}")
    return y.squeeze(0).to(t.dtype)


def random_scale_flip_crop(
    maps: Mapping[str, torch.Tensor],
    crop_h: int,
    crop_w: int,
    *,
    interpolation: Mapping[str, str],
    pad_value: Mapping[str, float],
    flip_negate_channel: Mapping[str, int] | None = None,
    scale_range: tuple[float, float] = (0.5, 1.5),
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """AdaShare's joint random scale, flip, pad and crop (see the module docstring).

    Args:
        maps: name -> ``(C, H, W)`` tensor; all share ``H, W``.
        crop_h, crop_w: output size.
        interpolation: name -> ``'bilinear'`` or ``'nearest'`` (every name in ``maps``).
        pad_value: name -> value written where padding is needed (every name in ``maps``).
        flip_negate_channel: name -> channel whose sign flips with a horizontal flip (the x component
            of a surface normal in a signed encoding).
        scale_range: ``(low, high)`` of the uniform scale factor.
        flip: whether to flip with probability 1/2.
        generator: source of randomness (default: torch's global generator).

    Returns:
        name -> ``(C, crop_h, crop_w)`` tensor of the input's dtype.
    """
    if not maps:
        return {}
    shapes = {k: tuple(v.shape[-2:]) for k, v in maps.items()}
    h, w = next(iter(shapes.values()))
    if any(s != (h, w) for s in shapes.values()):
        raise ValueError(f"all maps must share H, W; got {shapes}")
    low, high = scale_range
    scale = low + (high - low) * _uniform(generator)
    new_h, new_w = max(1, int(h * scale)), max(1, int(w * scale))
    do_flip = flip and _uniform(generator) > 0.5
    pad_h, pad_w = max(new_h, crop_h), max(new_w, crop_w)
    off_h, off_w = (pad_h - new_h) // 2, (pad_w - new_w) // 2
    start_h = _randint(pad_h - crop_h, generator)
    start_w = _randint(pad_w - crop_w, generator)
    negate = flip_negate_channel or {}
    out = {}
    for name, t in maps.items():
        x = resize(t, (new_h, new_w), interpolation[name])
        if do_flip:
            x = x.flip(-1)
            if name in negate:
                x[negate[name]] = -x[negate[name]]
        padded = torch.full((x.shape[0], pad_h, pad_w), pad_value[name], dtype=x.dtype)
        padded[:, off_h : off_h + new_h, off_w : off_w + new_w] = x
        out[name] = padded[:, start_h : start_h + crop_h, start_w : start_w + crop_w].contiguous()
    return out
