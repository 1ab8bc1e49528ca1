"""A built-in synthetic multi-task data set: ray-cast scenes whose labels agree with each other.

Each scene is seen by a pinhole camera at the origin looking down +z (x right, y down, z forward; the
camera frame in which the normals are given). It holds a back wall (``z = const``), a floor
(``y = const``), one to three spheres and zero to two axis-aligned boxes resting on the floor. For each
pixel the nearest hit along its ray gives:

- ``seg``: the class of the object hit (0 wall, 1 floor, 2 sphere, 3 box);
- ``depth``: the z coordinate of the hit point (metres, like NYU's depth);
- ``normal``: the unit surface normal at the hit point, facing the camera;
- ``img``: Lambertian shading of a per-object colour under a per-scene light, plus a little noise, on
  the 0..255 scale in BGR order minus AdaShare's BGR mean (the input convention of the real loaders).

Everything is drawn from ``numpy.random.default_rng((seed, split_stream, index))``, lazily per index, so
a sample is identical across runs, processes and workers. ``train1`` and ``train2`` are the two halves of
``train`` (disjoint, as AdaShare's are); ``test`` is an independent stream.

Sample: ``img`` float32 ``(3, H, W)``, ``seg`` int64 ``(H, W)``, ``normal`` float32 ``(3, H, W)`` (unit),
``depth`` float32 ``(1, H, W)`` (> 0 everywhere). At 64x64 a sample takes a few milliseconds on one CPU core.
"""

from __future__ import annotations

import numpy as np
import torch

from fastshare.data.transforms import IGNORE_INDEX, random_scale_flip_crop, subtract_mean, unit_normals

CLASS_NAMES: tuple[str, ...] = ("wall", "floor", "sphere", "box")
NUM_SEG_CLASSES = len(CLASS_NAMES)
_SPLIT_STREAM = {"train": 0, "test": 1}
_FOCAL = 1.1  # focal length in units of the image half-width (about 85 degrees field of view)


def _ray_directions(h: int, w: int) -> np.ndarray:
    """Unnormalised ray directions with z = 1, ``(H, W, 3)``."""
    half = max(h, w) / 2.0
    ys = (np.arange(h) + 0.5 - h / 2.0) / (_FOCAL * half)
    xs = (np.arange(w) + 0.5 - w / 2.0) / (_FOCAL * half)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx, yy, np.ones_like(xx)], axis=-1)


def render_scene(rng: np.random.Generator, height: int, width: int) -> dict[str, np.ndarray]:
    """Draw one scene from ``rng`` and ray-cast it.

    Returns numpy arrays: ``rgb`` ``(H, W, 3)`` float in 0..255, ``seg`` ``(H, W)`` int64, ``normal``
    ``(H, W, 3)`` unit, ``depth`` ``(H, W)`` > 0.
    """
    d = _ray_directions(height, width)
    t_best = np.full((height, width), np.inf)
    seg = np.zeros((height, width), dtype=np.int64)
    normal = np.zeros((height, width, 3))
    albedo = np.zeros((height, width, 3))

    def commit(t: np.ndarray, cls: int, n: np.ndarray, colour: np.ndarray) -> None:
        closer = (t > 1e-6) & (t < t_best)
        t_best[closer] = t[closer]
        seg[closer] = cls
        normal[closer] = n[closer] if n.ndim == 3 else n
        albedo[closer] = colour

    # Wall z = zw (normal towards the camera) and floor y = yf (normal pointing up, i.e. -y).
    zw = rng.uniform(6.0, 9.0)
    commit(zw / d[..., 2], 0, np.array([0.0, 0.0, -1.0]), rng.uniform(0.3, 0.9, 3))
    yf = rng.uniform(0.8, 1.5)
    with np.errstate(divide="ignore"):
        t_floor = np.where(d[..., 1] > 0, yf / d[..., 1], np.inf)
    commit(t_floor, 1, np.array([0.0, -1.0, 0.0]), rng.uniform(0.2, 0.8, 3))

    for _ in range(rng.integers(1, 4)):
        r = rng.uniform(0.35, 0.9)
        c = np.array([rng.uniform(-1.5, 1.5), yf - r, rng.uniform(2.0, min(5.5, zw - 1.0))])
        # |t d - c|^2 = r^2  ->  a t^2 - 2 b t + (|c|^2 - r^2) = 0
        a = (d * d).sum(-1)
        b = (d * c).sum(-1)
        disc = b * b - a * (c @ c - r * r)
        with np.errstate(invalid="ignore"):
            t = np.where(disc >= 0, (b - np.sqrt(np.maximum(disc, 0.0))) / a, np.inf)
        hit = np.isfinite(t)[..., None]
        n = (np.where(hit, t[..., None], 0.0) * d - c) / r  # missed rays: t = inf, normal unused
        commit(t, 2, np.where(hit, n, 0.0), rng.uniform(0.1, 1.0, 3))

    for _ in range(rng.integers(0, 3)):
        size = rng.uniform(0.5, 1.3, 3)
        lo = np.array([rng.uniform(-1.8, 1.8 - size[0]), yf - size[1], rng.uniform(2.0, min(5.0, zw - 1.0 - size[2]))])
        hi = lo + size
        with np.errstate(divide="ignore", invalid="ignore"):
            t1, t2 = lo / d, hi / d  # slab method; d_z > 0 always, d_x or d_y may be 0
        t_near, t_far = np.minimum(t1, t2), np.maximum(t1, t2)
        t_near = np.where(np.isnan(t_near), -np.inf, t_near)
        t_far = np.where(np.isnan(t_far), np.inf, t_far)
        t_in, t_out = t_near.max(-1), t_far.min(-1)
        axis = t_near.argmax(-1)
        t = np.where((t_in <= t_out) & (t_in > 0), t_in, np.inf)
        n = np.zeros_like(d)
        np.put_along_axis(n, axis[..., None], -np.sign(np.take_along_axis(d, axis[..., None], -1)), -1)
        commit(t, 3, n, rng.uniform(0.1, 1.0, 3))

    light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(-1.0, -0.4), rng.uniform(-1.0, -0.3)])
    light /= np.linalg.norm(light)  # direction from the surface towards the light
    shade = 0.35 + 0.65 * np.clip((normal * light).sum(-1), 0.0, None)
    rgb = albedo * shade[..., None] * 255.0 + rng.normal(0.0, 2.0, (height, width, 3))
    return {"rgb": np.clip(rgb, 0.0, 255.0), "seg": seg, "normal": normal, "depth": t_best * d[..., 2]}


class SyntheticScenes(torch.utils.data.Dataset):
    """Procedural multi-task scenes (tasks ``seg``, ``sn``, ``depth``), deterministic per ``(seed, split, index)``.

    Args:
        split: ``'train'``, ``'train1'`` (first half of train), ``'train2'`` (second half) or ``'test'``.
        num_train: size of ``train`` (``train1`` gets ``num_train // 2``, ``train2`` the rest).
        num_test: size of ``test``.
        size: ``(H, W)`` or one int for square images.
        seed: base seed.
        augment: apply AdaShare's random scale/flip/pad/crop (to ``size``); off by default.
        generator: randomness for augmentation (default: torch's global generator).

    Example::

        ds = SyntheticScenes("train", size=64)
        ds[0]["img"].shape   # torch.Size([3, 64, 64])
    """

    TASKS: tuple[str, ...] = ("seg", "sn", "depth")
    NUM_SEG_CLASSES = NUM_SEG_CLASSES

    def __init__(
        self,
        split: str = "train",
        *,
        num_train: int = 256,
        num_test: int = 64,
        size: int | tuple[int, int] = 64,
        seed: int = 0,
        augment: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        half = num_train // 2
        ranges = {"train": (0, num_train), "train1": (0, half), "train2": (half, num_train), "test": (0, num_test)}
        if split not in ranges:
            raise KeyError(f"split {split!r} not in {sorted(ranges)}")
        self.split = split
        self.stream = _SPLIT_STREAM["test" if split == "test" else "train"]
        self.start, stop = ranges[split]
        self.length = stop - self.start
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if min(self.size) < 8:
            raise ValueError(f"size must be at least 8x8, got {self.size}")
        self.seed = seed
        self.augment = augment
        self.generator = generator

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        rng = np.random.default_rng((self.seed, self.stream, self.start + index))
        scene = render_scene(rng, *self.size)
        img = torch.from_numpy(np.ascontiguousarray(scene["rgb"][:, :, ::-1].transpose(2, 0, 1), dtype=np.float32))
        seg = torch.from_numpy(scene["seg"]).unsqueeze(0)
        normal = torch.from_numpy(scene["normal"].transpose(2, 0, 1).astype(np.float32))
        depth = torch.from_numpy(scene["depth"].astype(np.float32)).unsqueeze(0)
        if self.augment:
            out = random_scale_flip_crop(
                {"img": img, "seg": seg, "normal": normal, "depth": depth},
                *self.size,
                interpolation={"img": "bilinear", "seg": "nearest", "normal": "nearest", "depth": "nearest"},
                pad_value={"img": 0.0, "seg": IGNORE_INDEX, "normal": 0.0, "depth": 0.0},
                flip_negate_channel={"normal": 0},
                generator=self.generator,
            )
            img, seg, normal, depth = out["img"], out["seg"], out["normal"], out["depth"]
        return {
            "img": subtract_mean(img),
            "seg": seg.squeeze(0),
            "normal": unit_normals(normal, normal.abs().sum(dim=0) > 0),
            "depth": depth,
        }
