"""Data sets: synthetic scenes (determinism, geometric consistency), the NYU v2 loader on the real samples,
CityScapes / Taskonomy decoding on tiny files written here, augmentation, and clear errors for bad files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastshare.config import load_config
from fastshare.data import (
    IMG_MEAN_BGR,
    CityScapes,
    DataFileError,
    NYUv2,
    SyntheticScenes,
    Taskonomy,
    build_dataset,
    nyu_split_from_folders,
)
from fastshare.data.synthetic import _FOCAL
from fastshare.data.transforms import random_scale_flip_crop

SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"
NYU_SAMPLES = SHARED_DATA / "nyu_v2_samples"
needs_nyu = pytest.mark.skipif(
    not NYU_SAMPLES.is_dir(), reason=f"real NYU v2 samples not found at {NYU_SAMPLES} (shared/ beside the repo)"
)
MEAN = torch.tensor(IMG_MEAN_BGR).view(3, 1, 1)


def _check_sample_contract(s: dict[str, torch.Tensor], h: int, w: int) -> None:
    assert s["img"].shape == (3, h, w) and s["img"].dtype == torch.float32
    assert s["seg"].shape == (h, w) and s["seg"].dtype == torch.int64
    assert s["normal"].shape == (3, h, w) and s["normal"].dtype == torch.float32
    assert s["depth"].shape == (1, h, w) and s["depth"].dtype == torch.float32
    norm = s["normal"].norm(dim=0)
    assert torch.all(((norm - 1).abs() < 1e-5) | (norm == 0)), "normals must be unit or exactly 0"


# ----------------------------------------------------------------------------------------- synthetic


def test_synthetic_contract_and_determinism():
    a, b = SyntheticScenes("train", size=(48, 64), seed=3), SyntheticScenes("train", size=(48, 64), seed=3)
    assert len(a) == 256
    for i in (0, 17):
        sa, sb = a[i], b[i]
        _check_sample_contract(sa, 48, 64)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert set(sa["seg"].unique().tolist()) <= {0, 1, 2, 3}
        assert (sa["depth"] > 0).all() and (sa["normal"].norm(dim=0) > 0.99).all()
    assert not torch.equal(a[0]["img"], SyntheticScenes("train", size=(48, 64), seed=4)[0]["img"])
    assert not torch.equal(a[0]["img"], SyntheticScenes("test", size=(48, 64), seed=3)[0]["img"])


def test_synthetic_splits_train1_train2_are_halves_of_train():
    train = SyntheticScenes("train", num_train=10, size=16)
    t1, t2 = SyntheticScenes("train1", num_train=10, size=16), SyntheticScenes("train2", num_train=10, size=16)
    assert (len(t1), len(t2)) == (5, 5)
    assert torch.equal(t1[4]["depth"], train[4]["depth"]) and torch.equal(t2[0]["depth"], train[5]["depth"])
    with pytest.raises(IndexError):
        t1[5]
    with pytest.raises(KeyError, match="val"):
        SyntheticScenes("val")


def test_synthetic_normals_agree_with_depth():
    """Back-project the depth map to 3D points; the cross product of neighbouring differences is the normal."""
    size = 96
    s = SyntheticScenes("test", size=size, seed=0)[1]
    z = s["depth"][0].double()
    c = (torch.arange(size, dtype=torch.float64) + 0.5 - size / 2) / (_FOCAL * size / 2)
    y, x = torch.meshgrid(c, c, indexing="ij")
    pts = torch.stack([x * z, y * z, z])  # (3, H, W)
    dx = pts[:, 1:-1, 2:] - pts[:, 1:-1, :-2]
    dy = pts[:, 2:, 1:-1] - pts[:, :-2, 1:-1]
    n = torch.linalg.cross(dy, dx, dim=0)
    n = n / n.norm(dim=0, keepdim=True)
    n = n * -torch.sign((n * pts[:, 1:-1, 1:-1]).sum(0, keepdim=True))  # face the camera
    seg = s["seg"]
    interior = torch.ones_like(seg[1:-1, 1:-1], dtype=torch.bool)
    for dh, dw in ((0, 1), (2, 1), (1, 0), (1, 2)):
        interior &= seg[dh : dh + size - 2, dw : dw + size - 2] == seg[1:-1, 1:-1]
    cos = (n * s["normal"][:, 1:-1, 1:-1].double()).sum(0)[interior]
    angles = torch.rad2deg(torch.acos(cos.clamp(-1, 1)))
    assert interior.sum() > 0.8 * interior.numel()
    assert (angles < 5).float().mean() > 0.97, f"median angle {angles.median():.2f}"
    # the image is shaded from the same normals: flat surfaces of one class have (nearly) one colour
    wall = seg == 0
    assert (s["img"][:, wall].std(dim=1) < 5).all()


def test_synthetic_through_dataloader_and_augment():
    ds = SyntheticScenes("train", num_train=8, size=32, augment=True, generator=torch.Generator().manual_seed(0))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["img"].shape == (4, 3, 32, 32) and batch["seg"].shape == (4, 32, 32)
    assert batch["depth"].shape == (4, 1, 32, 32) and batch["normal"].shape == (4, 3, 32, 32)


def test_build_dataset_from_config():
    cfg = load_config({"dataload": {"crop_h": 40, "crop_w": 48}})
    ds = build_dataset(cfg, "train1")
    assert isinstance(ds, SyntheticScenes) and ds[0]["img"].shape == (3, 40, 48)
    cfg = load_config({"tasks": ["seg", "keypoint"], "tasks_num_class": [4, 1], "lambdas": [1, 1]})
    with pytest.raises(ValueError, match="no task"):
        build_dataset(cfg, "train")


# ------------------------------------------------------------------------------------- augmentation


def test_augment_pads_with_ignore_values_and_keeps_labels():
    img = torch.rand(3, 20, 30) * 255
    seg = torch.randint(0, 5, (1, 20, 30))
    normal = torch.rand(3, 20, 30)
    out = random_scale_flip_crop(
        {"img": img, "seg": seg, "normal": normal},
        20,
        30,
        interpolation={"img": "bilinear", "seg": "nearest", "normal": "nearest"},
        pad_value={"img": 0.0, "seg": 255, "normal": 0.0},
        scale_range=(0.5, 0.5),
        flip=False,
    )
    assert out["seg"].dtype == torch.int64 and out["seg"].shape == (1, 20, 30)
    # scaled to 10x15 and centred in 20x30: offsets (5, 7); everything outside is padding
    assert (out["seg"][:, :5] == 255).all() and (out["seg"][:, 15:] == 255).all()
    assert (out["img"][:, :, :7] == 0).all() and (out["normal"][:, :, 22:] == 0).all()
    inner = out["seg"][0, 5:15, 7:22]
    assert torch.equal(inner, seg[0, ::2, ::2])  # nearest neighbour at scale 1/2 takes every other pixel


def test_augment_flip_and_crop_window():
    x = torch.arange(2 * 6 * 8, dtype=torch.float32).view(2, 6, 8)
    g = torch.Generator().manual_seed(0)
    kw = dict(
        interpolation={"x": "nearest"}, pad_value={"x": 0.0}, flip_negate_channel={"x": 1}, scale_range=(1.0, 1.0)
    )
    seen_flip = seen_plain = False
    for _ in range(20):
        out = random_scale_flip_crop({"x": x}, 4, 5, generator=g, **kw)["x"]
        # find the window: the output is a crop of x or of its flip (channel 1 negated when flipped)
        for flipped, src in ((False, x), (True, torch.stack([x[0].flip(-1), -x[1].flip(-1)]))):
            for i in range(3):
                for j in range(4):
                    if torch.equal(out, src[:, i : i + 4, j : j + 5]):
                        seen_flip |= flipped
                        seen_plain |= not flipped
    assert seen_flip and seen_plain


# --------------------------------------------------------------------------------- NYU v2 (real data)


@needs_nyu
def test_nyu_split_from_folders():
    split = nyu_split_from_folders(NYU_SAMPLES)
    assert list(split) == ["test"]
    assert [e[0] for e in split["test"]] == ["img/0061.png", "img/0295.png", "img/0774.png", "img/1314.png"]
    assert split["test"][0] == ("img/0061.png", "seg/0061.png", "normal_mask/0061.png", "depth/0061.npy")


@needs_nyu
def test_nyu_real_sample_matches_files():
    ds = NYUv2(NYU_SAMPLES, "test", splits=nyu_split_from_folders(NYU_SAMPLES))
    assert len(ds) == 4 and not ds.augment and ds.name(0) == "0061.png"
    s = ds[0]
    _check_sample_contract(s, 480, 640)
    rgb = np.asarray(Image.open(NYU_SAMPLES / "img/0061.png"), dtype=np.float32)
    bgr = torch.from_numpy(rgb[:, :, ::-1].copy()).permute(2, 0, 1)
    torch.testing.assert_close(s["img"], bgr - MEAN, rtol=0, atol=1e-4)  # BGR order, BGR mean
    seg = torch.from_numpy(np.asarray(Image.open(NYU_SAMPLES / "seg/0061.png")).astype(np.int64))
    assert torch.equal(s["seg"], seg) and set(seg.unique().tolist()) <= set(range(40)) | {255}
    raw = np.asarray(Image.open(NYU_SAMPLES / "normal_mask/0061.png"), dtype=np.float32)
    raw = torch.from_numpy(raw[:, :, ::-1].copy()).permute(2, 0, 1)  # BGR, as OpenCV reads it
    invalid = (raw == 255).any(dim=0)
    assert 0 < invalid.float().mean() < 0.5
    assert (s["normal"][:, invalid] == 0).all()
    torch.testing.assert_close(s["normal"][:, ~invalid], raw[:, ~invalid] / raw[:, ~invalid].norm(dim=0))
    depth = torch.from_numpy(np.load(NYU_SAMPLES / "depth/0061.npy"))
    assert torch.equal(s["depth"][0], depth) and (depth > 0.4).all()


@needs_nyu
def test_nyu_real_sample_augmented():
    split = nyu_split_from_folders(NYU_SAMPLES)
    def make() -> NYUv2:
        gen = torch.Generator().manual_seed(5)
        return NYUv2(NYU_SAMPLES, "test", 321, 321, splits=split, augment=True, generator=gen)

    a, b = make()[1], make()[1]
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded generator -> same augmentation
    _check_sample_contract(a, 321, 321)
    labels = set(np.unique(np.asarray(Image.open(NYU_SAMPLES / "seg/0295.png"))).tolist())
    assert set(a["seg"].unique().tolist()) <= labels | {255}
    assert ((a["depth"] == 0) | (a["depth"] > 0.4)).all()


# ---------------------------------------------------------------------- tiny on-disk data sets (tmp)


def _write_nyu(root: Path, n: int = 2, h: int = 12, w: int = 16) -> None:
    rng = np.random.default_rng(0)
    entries = []
    for sub in ("img", "seg", "normal_mask", "depth"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"img/{i}.png")
        Image.fromarray(rng.integers(0, 40, (h, w), dtype=np.uint8)).save(root / f"seg/{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"normal_mask/{i}.png")
        np.save(root / f"depth/{i}.npy", rng.uniform(0.5, 10, (h, w)).astype(np.float32))
        entries.append([f"img/{i}.png", f"seg/{i}.png", f"normal_mask/{i}.png", f"depth/{i}.npy"])
    (root / "nyu_v2_3task.json").write_text(json.dumps({"train": entries, "test": entries[:1]}))


def test_nyu_json_splits_and_train_augmentation(tmp_path: Path):
    _write_nyu(tmp_path)
    train = NYUv2(tmp_path, "train", 10, 10)
    assert len(train) == 2 and train.augment
    _check_sample_contract(train[0], 10, 10)
    # a crop larger than 1.5x the 12x16 image is always padded: image 0 - mean, seg 255, normal 0, depth 0
    big = NYUv2(tmp_path, "train", 30, 30, generator=torch.Generator().manual_seed(0))[1]
    _check_sample_contract(big, 30, 30)
    pad = big["depth"][0] == 0
    assert pad[0].all() and pad[:, 0].all() and not pad.all()
    assert (big["seg"][pad] == 255).all() and (big["normal"][:, pad] == 0).all()
    torch.testing.assert_close(big["img"][:, pad], -MEAN[:, :, 0].expand(3, int(pad.sum())))
    assert (big["depth"][0][~pad] >= 0.5).all()
    test = NYUv2(tmp_path, "test")
    assert len(test) == 1 and not test.augment
    _check_sample_contract(test[0], 12, 16)
    with pytest.raises(KeyError, match="train1"):
        NYUv2(tmp_path, "train1")


def test_nyu_corrupt_and_missing_files_name_the_file(tmp_path: Path):
    _write_nyu(tmp_path)
    (tmp_path / "img/0.png").write_bytes(b"this is not a png at all")
    ds = NYUv2(tmp_path, "test")
    with pytest.raises(DataFileError, match=r"img/0\.png.*cannot decode image"):
        ds[0]
    _write_nyu(tmp_path)
    data = (tmp_path / "depth/0.npy").read_bytes()
    (tmp_path / "depth/0.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFileError, match=r"depth/0\.npy.*cannot read \.npy"):
        ds[0]
    _write_nyu(tmp_path)
    png = (tmp_path / "seg/0.png").read_bytes()
    (tmp_path / "seg/0.png").write_bytes(png[: len(png) - 40])  # truncated PNG
    with pytest.raises(DataFileError, match=r"seg/0\.png"):
        ds[0]
    _write_nyu(tmp_path)
    (tmp_path / "normal_mask/0.png").unlink()
    with pytest.raises(DataFileError, match=r"normal_mask/0\.png: no such file"):
        ds[0]
    (tmp_path / "nyu_v2_3task.json").write_text("{not json")
    with pytest.raises(DataFileError, match=r"nyu_v2_3task\.json: not valid JSON"):
        NYUv2(tmp_path, "test")
    with pytest.raises(DataFileError, match=r"no such split file"):
        NYUv2(tmp_path / "nowhere", "test")


def test_nyu_size_mismatch_is_an_error(tmp_path: Path):
    _write_nyu(tmp_path, n=1)
    np.save(tmp_path / "depth/0.npy", np.ones((5, 5), np.float32))
    with pytest.raises(DataFileError, match=r"depth/0\.npy.*differs from the image"):
        NYUv2(tmp_path, "test")[0]


def _write_cityscapes(root: Path, h: int = 8, w: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = {
        "img": rng.uniform(0, 1, (h, w, 3)).astype(np.float32),
        "depth": rng.uniform(0, 1, (h, w, 1)).astype(np.float32),
        "label2": rng.integers(-1, 2, (h, w)),
        "label7": rng.integers(-1, 7, (h, w)),
        "label19": rng.integers(-1, 19, (h, w)),
    }
    for name, arr in arrays.items():
        np.save(root / f"{name}.npy", arr)
    group = [f"{n}.npy" for n in arrays]
    (root / "cityscape.json").write_text(json.dumps({"train": [group] * 3, "test": [group]}))
    return arrays


@pytest.mark.parametrize("num_class", [2, 7, 19])
def test_cityscapes_decoding(tmp_path: Path, num_class: int):
    arrays = _write_cityscapes(tmp_path)
    s = CityScapes(tmp_path, "test", num_class=num_class)[0]
    expected_img = torch.from_numpy(arrays["img"][:, :, ::-1].copy() * 255).permute(2, 0, 1) - MEAN
    torch.testing.assert_close(s["img"], expected_img)
    label = torch.from_numpy(arrays[f"label{num_class}"])
    assert s["seg"].dtype == torch.int64
    assert torch.equal(s["seg"], torch.where(label == -1, 255, label))  # -1 ignore -> 255
    assert torch.equal(s["depth"], torch.from_numpy(arrays["depth"]).permute(2, 0, 1))
    t = CityScapes(tmp_path, "train", 6, 10, num_class=num_class)[0]
    assert t["img"].shape == (3, 6, 10) and t["seg"].shape == (6, 10) and t["depth"].shape == (1, 6, 10)
    assert set(t["seg"].unique().tolist()) <= set(range(num_class)) | {255}


def test_cityscapes_errors(tmp_path: Path):
    _write_cityscapes(tmp_path)
    np.save(tmp_path / "label7.npy", np.full((8, 16), 9))
    with pytest.raises(DataFileError, match=r"label7\.npy.*found 9"):
        CityScapes(tmp_path, "test", num_class=7)[0]
    data = (tmp_path / "img.npy").read_bytes()
    (tmp_path / "img.npy").write_bytes(data[:100])
    with pytest.raises(DataFileError, match=r"img\.npy.*cannot read \.npy"):
        CityScapes(tmp_path, "test")[0]
    with pytest.raises(ValueError, match="2, 7 or 19"):
        CityScapes(tmp_path, "test", num_class=5)
    cfg = load_config({"dataload": {"dataset": "CityScapes", "dataroot": str(tmp_path)}})
    with pytest.raises(ValueError, match=r"no task\(s\) \['sn'\]"):
        build_dataset(cfg, "test")


def _write_taskonomy(root: Path, h: int = 32, w: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    arrays = {
        "rgb": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "seg": rng.integers(0, 18, (h, w), dtype=np.uint8),
        "normal": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "depth": rng.integers(0, 65535, (h, w), dtype=np.uint16),
        "keypoint": rng.integers(0, 700, (h, w), dtype=np.uint16),
        "edge": rng.integers(0, 6000, (h, w), dtype=np.uint16),
    }
    arrays["depth"][0, :] = 65000  # invalid row
    for name, arr in arrays.items():
        Image.fromarray(arr).save(root / f"{name}.png")
    np.save(root / "semseg_prior_factor.npy", np.linspace(0.5, 2.0, 17))
    group = [f"{n}.png" for n in arrays]
    (root / "taskonomy.json").write_text(json.dumps({"train": [group], "test_small": [group]}))
    return arrays


def test_taskonomy_decoding(tmp_path: Path):
    a = _write_taskonomy(tmp_path)
    ds = Taskonomy(tmp_path, "test_small")
    assert ds.class_weights is not None and ds.class_weights.shape == (17,)
    s = ds[0]
    assert s["img"].shape == (3, 256, 256) and s["keypoint"].shape == (1, 256, 256) and s["edge"].shape == (1, 256, 256)
    up = lambda x: np.repeat(np.repeat(x, 8, axis=0), 8, axis=1)  # 32 -> 256 nearest
    bgr = torch.from_numpy(up(a["rgb"])[:, :, ::-1].astype(np.float32).copy()).permute(2, 0, 1)
    torch.testing.assert_close(s["img"], bgr - MEAN)
    seg = up(a["seg"]).astype(np.int64)
    assert torch.equal(s["seg"], torch.from_numpy(np.where(seg == 0, 255, seg - 1)))
    d = up(a["depth"]).astype(np.float64)
    ok = d < 64500
    expected_depth = np.where(ok, np.log1p(d) / math.log(2**16), 0.0)
    torch.testing.assert_close(s["depth"][0].double(), torch.from_numpy(expected_depth), rtol=1e-6, atol=1e-6)
    assert (s["normal"][:, :8] == 0).all()  # invalid depth row -> normal 0
    raw_n = torch.from_numpy(up(a["normal"]).astype(np.float32) / 255 * 2 - 1).permute(2, 0, 1)
    valid = torch.from_numpy(ok) & (raw_n.norm(dim=0) > 0)
    torch.testing.assert_close(s["normal"][:, valid], raw_n[:, valid] / raw_n[:, valid].norm(dim=0))
    kp = np.clip(up(a["keypoint"]) / 2**16, 0, 0.005) / 0.005 * 2 - 1
    torch.testing.assert_close(s["keypoint"][0].double(), torch.from_numpy(kp), rtol=1e-5, atol=1e-5)
    edge = np.clip(up(a["edge"]) / 2**16, 0, 0.08) / 0.08 * 2 - 1
    assert 0 < (edge == 1).mean() < 1  # the data reach the clip: a wrong clip bound changes the values
    torch.testing.assert_close(s["edge"][0].double(), torch.from_numpy(edge), rtol=1e-5, atol=1e-5)
    assert Taskonomy(tmp_path, "test_small", unlabelled_as_ignore=False)[0]["seg"].max() < 17
    t = Taskonomy(tmp_path, "train", 224, 224, generator=torch.Generator().manual_seed(0))[0]
    assert t["img"].shape == (3, 224, 224) and t["seg"].shape == (224, 224)
    kp_t = t["keypoint"]
    assert (((kp_t >= -1) & (kp_t <= 1)) | (kp_t == 255)).all()


def test_taskonomy_garbage_png_names_the_file(tmp_path: Path):
    _write_taskonomy(tmp_path)
    (tmp_path / "edge.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataFileError, match=r"edge\.png.*cannot decode image"):
        Taskonomy(tmp_path, "test_small")[0]
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "seg.png")
    with pytest.raises(DataFileError, match=r"seg\.png.*single-channel"):
        Taskonomy(tmp_path, "test_small")[0]


# ------------------------------------------------------------------- corrupt values, empty splits


def test_empty_split_is_an_error_naming_split_and_file(tmp_path: Path):
    _write_nyu(tmp_path / "nyu")
    index = tmp_path / "nyu" / "nyu_v2_3task.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "test": []}))
    with pytest.raises(DataFileError, match=r"nyu_v2_3task\.json: split 'test' has no samples"):
        NYUv2(tmp_path / "nyu", "test")
    with pytest.raises(ValueError, match="split 'test' of the given splits has no samples"):
        NYUv2(tmp_path / "nyu", "test", splits={"test": []})
    _write_cityscapes(tmp_path)
    (tmp_path / "cityscape.json").write_text(json.dumps({"test": []}))
    with pytest.raises(DataFileError, match=r"cityscape\.json: split 'test' has no samples"):
        CityScapes(tmp_path, "test")
    _write_taskonomy(tmp_path)
    (tmp_path / "taskonomy.json").write_text(json.dumps({"test_small": []}))
    with pytest.raises(DataFileError, match=r"taskonomy\.json: split 'test_small' has no samples"):
        Taskonomy(tmp_path, "test_small")


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("seg/0.png", np.full((12, 16), 100, np.uint8), r"seg/0\.png: labels must be 0\.\.39 or 255 .*found 100"),
        ("normal_mask/0.png", np.full((12, 16), 128, np.uint8), r"normal_mask/0\.png: expected a 3-channel"),
        ("depth/0.npy", np.ones((12, 16), bool), r"depth/0\.npy: expected floating-point values, got dtype bool"),
        ("depth/0.npy", np.ones((12, 16), np.complex64), r"depth/0\.npy: .*got dtype complex64"),
        ("depth/0.npy", np.full((12, 16), "a"), r"depth/0\.npy: .*got dtype <U1"),
        ("depth/0.npy", np.where(np.eye(12, 16) > 0, np.nan, 1.0), r"depth/0\.npy: 12 value\(s\) are NaN"),
        ("depth/0.npy", np.full((12, 16), np.inf, np.float32), r"depth/0\.npy: 192 value\(s\) are NaN or infinite"),
        ("depth/0.npy", np.full((12, 16), -1.5, np.float32), r"depth/0\.npy: depth must be >= 0 .*found -1\.5"),
    ],
)
def test_nyu_corrupt_values_name_the_file(tmp_path: Path, name: str, content: np.ndarray, pattern: str):
    _write_nyu(tmp_path)
    if name.endswith(".png"):
        Image.fromarray(content).save(tmp_path / name)
    else:
        np.save(tmp_path / name, content)
    with pytest.raises(DataFileError, match=pattern):
        NYUv2(tmp_path, "test")[0]


def test_nyu_depth_with_channel_axis_and_zeros_is_valid(tmp_path: Path):
    _write_nyu(tmp_path)
    depth = np.load(tmp_path / "depth/0.npy")
    depth[0] = 0.0  # invalid pixels
    np.save(tmp_path / "depth/0.npy", depth[:, :, None].astype(np.float64))
    assert torch.equal(NYUv2(tmp_path, "test")[0]["depth"][0], torch.from_numpy(depth))


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("img.npy", np.ones((8, 16, 3), np.complex64), r"img\.npy: expected floating-point values, got dtype complex"),
        ("img.npy", np.full((8, 16, 3), np.nan, np.float32), r"img\.npy: 384 value\(s\) are NaN"),
        ("depth.npy", np.full((8, 16, 1), np.nan, np.float32), r"depth\.npy: 128 value\(s\) are NaN"),
        ("depth.npy", np.full((8, 16), -0.5, np.float32), r"depth\.npy: depth must be >= 0"),
        ("depth.npy", np.ones((8, 16), bool), r"depth\.npy: .*got dtype bool"),
        ("label19.npy", np.ones((8, 16), bool), r"label19\.npy: expected integer or floating-point .*dtype bool"),
        ("label19.npy", np.full((8, 16), "1"), r"label19\.npy: .*got dtype <U1"),
    ],
)
def test_cityscapes_corrupt_values_name_the_file(tmp_path: Path, name: str, content: np.ndarray, pattern: str):
    _write_cityscapes(tmp_path)
    np.save(tmp_path / name, content)
    with pytest.raises(DataFileError, match=pattern):
        CityScapes(tmp_path, "test")[0]


def test_taskonomy_corrupt_prior_and_normal_name_the_file(tmp_path: Path):
    _write_taskonomy(tmp_path)
    prior = tmp_path / "semseg_prior_factor.npy"
    np.save(prior, np.ones(16))
    with pytest.raises(DataFileError, match=r"semseg_prior_factor\.npy: expected 17 class weights, got 16"):
        Taskonomy(tmp_path, "test_small")
    np.save(prior, np.where(np.arange(17) == 3, np.nan, 1.0))
    with pytest.raises(DataFileError, match=r"semseg_prior_factor\.npy: 1 value\(s\) are NaN"):
        Taskonomy(tmp_path, "test_small")
    np.save(prior, np.full(17, -1.0))
    with pytest.raises(DataFileError, match=r"semseg_prior_factor\.npy: class weights must be >= 0"):
        Taskonomy(tmp_path, "test_small")
    np.save(prior, np.ones(17))
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(tmp_path / "normal.png")
    with pytest.raises(DataFileError, match=r"normal\.png: expected a 3-channel"):
        Taskonomy(tmp_path, "test_small")[0]


@pytest.mark.parametrize("dataset, tasks, classes, message", [
    ("NYU_v2", ["seg", "sn"], [20, 3], "tasks_num_class: NYU_v2 stores 40 segmentation classes, the configuration "
                                       "gives seg 20"),
    ("Taskonomy", ["seg"], [40], "Taskonomy stores 17 segmentation classes"),
    ("CityScapes", ["seg", "depth"], [8, 1], "CityScapes stores 2, 7 or 19 segmentation classes"),
    ("Synthetic", ["seg"], [3], "Synthetic stores at least 4 segmentation classes"),
    ("Synthetic", ["keypoint"], [1], r"tasks: dataset 'Synthetic' has no task\(s\) \['keypoint'\]"),
])
def test_configuration_must_match_the_data_set(dataset, tasks, classes, message):
    """A class count the data set does not store fails before any data is read (NYU with 20 classes used
    to fail at the first validation, on a label >= 20)."""
    from fastshare.config import ConfigError, load_config
    from fastshare.data import check_tasks_provided

    cfg = load_config({"tasks": tasks, "tasks_num_class": classes, "lambdas": [1] * len(tasks),
                       "dataload": {"dataset": dataset, "dataroot": "/no/data/needed"}})
    with pytest.raises(ConfigError, match=message):
        check_tasks_provided(cfg)
    ok = {"NYU_v2": 40, "Taskonomy": 17, "CityScapes": 19, "Synthetic": 4}[dataset]
    if "seg" in tasks:
        check_tasks_provided(load_config({**cfg.to_dict(), "tasks_num_class": [ok] + classes[1:]}))
