"""Tests for gfldet.data: COCO dataset, image decoding, transforms, collate, samplers, loader."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image

from gfldet.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CocoDetection,
    GroupedBatchSampler,
    KeepRatioResize,
    SeededIndex,
    ShardSampler,
    build_dataloader,
    build_transforms,
    collate,
    detection_bbox_params,
    generate_synthetic_coco,
    load_image_rgb,
    normalize_batch,
    rescale_size,
)

# --------------------------------------------------------------------------- helpers


def _write_coco(
    tmp_path: Path, images: list[dict], annotations: list[dict], categories: list[dict]
) -> Path:
    """Write the JSON and a random image for every entry of ``images``."""
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for im in images:
        pixels = rng.integers(0, 255, (im["height"], im["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(img_dir / im["file_name"])
    for i, ann in enumerate(annotations):
        ann.setdefault("id", i + 1)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return ann_file


def _image(image_id: int, h: int, w: int) -> dict:
    return {"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w}


CATS = [{"id": 12, "name": "c12"}, {"id": 3, "name": "c3"}, {"id": 7, "name": "c7"}]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("synthetic")
    return generate_synthetic_coco(
        out, num_train=10, num_val=4, image_size=(96, 160), num_workers=1
    )


# --------------------------------------------------------------------------- dataset


def test_category_mapping_round_trip(tmp_path: Path) -> None:
    anns = [
        {"image_id": 1, "category_id": 12, "bbox": [1, 1, 10, 10]},
        {"image_id": 1, "category_id": 3, "bbox": [20, 20, 10, 10]},
        {"image_id": 1, "category_id": 7, "bbox": [40, 5, 10, 10]},
    ]
    ds = CocoDetection(
        tmp_path / "images", _write_coco(tmp_path, [_image(1, 64, 64)], anns, CATS), None
    )
    assert ds.label_to_cat_id == [3, 7, 12]  # sorted category-id order
    assert ds.class_names == ["c3", "c7", "c12"]
    assert ds.num_classes == 3
    assert all(ds.label_to_cat_id[ds.cat_id_to_label[c]] == c for c in (3, 7, 12))
    _, target = ds[0]
    cat_ids = [ds.label_to_cat_id[int(label)] for label in target["labels"]]
    assert cat_ids == [12, 3, 7]  # annotation order preserved, ids recoverable
    assert target["labels"].dtype == torch.int64


def test_crowd_excluded_and_filter_empty(tmp_path: Path) -> None:
    images = [_image(1, 64, 64), _image(2, 64, 64), _image(3, 64, 64), _image(4, 20, 100)]
    anns = [
        {"image_id": 1, "category_id": 3, "bbox": [1, 1, 10, 10]},
        {"image_id": 1, "category_id": 3, "bbox": [5, 5, 30, 30], "iscrowd": 1},
        {"image_id": 2, "category_id": 3, "bbox": [5, 5, 30, 30], "iscrowd": 1},  # crowd only
        {"image_id": 4, "category_id": 7, "bbox": [1, 1, 10, 10]},  # short side 20 < 32
    ]  # image 3 has no annotations
    ann_file = _write_coco(tmp_path, images, anns, CATS)

    train = CocoDetection(tmp_path / "images", ann_file, None, filter_empty=True, min_size=32)
    assert train.image_ids.tolist() == [1]
    _, target = train[0]
    assert target["boxes"].tolist() == [[1.0, 1.0, 11.0, 11.0]]  # the crowd box is gone

    val = CocoDetection(tmp_path / "images", ann_file, None, filter_empty=False)
    assert val.image_ids.tolist() == [1, 2, 3, 4]
    assert val.aspect_ratios.tolist() == [1.0, 1.0, 1.0, 5.0]
    assert [len(val[i][1]["boxes"]) for i in range(4)] == [1, 0, 0, 1]
    empty = val[1][1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_xywh_to_xyxy_clipping_and_degenerate(tmp_path: Path) -> None:
    anns = [
        {"image_id": 1, "category_id": 3, "bbox": [10.5, 20, 30, 40]},  # plain
        {"image_id": 1, "category_id": 3, "bbox": [-5, -5, 20, 10]},  # clipped at top-left
        {"image_id": 1, "category_id": 3, "bbox": [90, 50, 30, 30]},  # clipped at right (w=100)
        {"image_id": 1, "category_id": 3, "bbox": [10, 10, 0.5, 20]},  # w < 1: dropped
        {"image_id": 1, "category_id": 3, "bbox": [99.5, 10, 5, 20]},  # w 0.5 after clip: dropped
        {"image_id": 1, "category_id": 3, "bbox": [150, 10, 5, 5]},  # fully outside: dropped
    ]
    ds = CocoDetection(
        tmp_path / "images", _write_coco(tmp_path, [_image(1, 60, 100)], anns, CATS), None
    )
    image, target = ds[0]
    assert image.shape == (3, 60, 100) and image.dtype == torch.uint8
    expected = [[10.5, 20, 40.5, 60], [0, 0, 15, 5], [90, 50, 100, 60]]
    assert torch.allclose(target["boxes"], torch.tensor(expected))
    assert target["orig_size"] == (60, 100) and target["image_size"] == (60, 100)
    assert target["image_id"] == 1


def test_dataset_with_transform_scales_boxes(tmp_path: Path) -> None:
    anns = [{"image_id": 1, "category_id": 3, "bbox": [10, 20, 100, 200]}]
    ann_file = _write_coco(tmp_path, [_image(1, 480, 640)], anns, CATS)
    ds = CocoDetection(tmp_path / "images", ann_file, build_transforms(False, 800, 1333, 0.0))
    image, target = ds[0]
    assert image.shape == (3, 800, 1067)
    assert target["image_size"] == (800, 1067) and target["orig_size"] == (480, 640)
    sx, sy = 1067 / 640, 800 / 480
    expected = torch.tensor([[10 * sx, 20 * sy, 110 * sx, 220 * sy]])
    assert torch.allclose(target["boxes"], expected, atol=1e-3)


# --------------------------------------------------------------------------- image decoding


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "1", "LA"])
def test_decode_modes_to_rgb(tmp_path: Path, mode: str) -> None:
    rgb = np.random.default_rng(1).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    img = Image.fromarray(rgb).convert(mode)
    if mode == "P":
        img.info["transparency"] = 0
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(path)
    out = load_image_rgb(path)
    assert out.shape == (12, 16, 3) and out.dtype == np.uint8
    if mode in ("L", "LA", "1"):  # gray replicated into three equal channels
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    if mode == "RGBA":
        assert np.array_equal(out, rgb)  # alpha dropped, colour untouched


def test_decode_16bit_gray_rescaled(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    out = load_image_rgb(tmp_path / "g16.png")
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]  # rescaled, not clipped at 255


def test_decode_applies_exif_orientation(tmp_path: Path) -> None:
    pixels = np.zeros((10, 30, 3), np.uint8)
    pixels[:, :5] = 255  # white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_image_rgb(tmp_path / "r.jpg")
    assert out.shape == (30, 10, 3)
    assert out[:5].mean() > 200 and out[-5:].mean() < 50  # band now on top


# --------------------------------------------------------------------------- transforms


@pytest.mark.parametrize(
    ("hw", "expected"),
    [
        ((480, 640), (800, 1067)),
        ((1000, 100), (1333, 133)),  # long side caps the scale
        ((100, 1000), (133, 1333)),
        ((333, 500), (800, 1201)),
        ((427, 640), (800, 1199)),
        ((800, 1333), (800, 1333)),
    ],
)
def test_rescale_size_matches_mmdet(hw: tuple[int, int], expected: tuple[int, int]) -> None:
    assert rescale_size(*hw, short_side=800, max_size=1333) == expected


def test_resize_transform_image_and_boxes_consistent() -> None:
    t = build_transforms(False, 800, 1333, 0.0)
    image = np.zeros((1000, 100, 3), np.uint8)
    image[100:300, 20:60] = 255
    out = t(image=image, bboxes=np.array([[20, 100, 60, 300]], np.float32), labels=np.array([2]))
    assert out["image"].shape == (3, 1333, 133) and out["image"].dtype == torch.uint8
    x0, y0, x1, y1 = out["bboxes"][0]
    # The bright rectangle in the resized image sits where the box says.
    bright = (out["image"][0] > 0).nonzero()
    assert (
        abs(bright[:, 0].min().item() - y0) <= 1.5
        and abs(bright[:, 0].max().item() + 1 - y1) <= 1.5
    )
    assert (
        abs(bright[:, 1].min().item() - x0) <= 1.5
        and abs(bright[:, 1].max().item() + 1 - x1) <= 1.5
    )
    assert np.asarray(out["labels"]).tolist() == [2]  # a list before albumentations 2


def test_normalize_uses_pixel_units_and_zeroes_the_padding() -> None:
    images = torch.full((2, 3, 4, 6), 40, dtype=torch.uint8)
    out = normalize_batch(images, [(4, 6), (3, 2)], mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 5.0))
    assert out.dtype == torch.float32
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([15.0, 5.0, 2.0]))
    assert torch.equal(out[0], out[0, :, :1, :1].expand(3, 4, 6))  # the full-size image: no padding
    assert torch.allclose(out[1, :, :3, :2], out[0, :, :3, :2])
    assert (out[1, :, 3:] == 0).all() and (out[1, :, :, 2:] == 0).all()  # padding = the mean pixel
    with pytest.raises(TypeError, match="uint8"):
        normalize_batch(out)


def test_normalize_is_bit_identical_to_albumentations() -> None:
    """Normalising on the device reproduces albumentations' Normalize in the workers exactly,
    so moving it changed no training result."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    image[0, :3] = [[0, 0, 0], [255, 255, 255], [128, 7, 250]]  # both ends of the range
    reference = A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=1.0)(
        image=image
    )["image"]
    got = normalize_batch(torch.from_numpy(image).permute(2, 0, 1)[None].contiguous())
    assert torch.equal(got[0], torch.from_numpy(reference).permute(2, 0, 1))


def test_multiscale_short_side_sampled_in_range_and_seeded() -> None:
    resize = A.Compose([KeepRatioResize((20, 30), 1000)])
    image = np.zeros((40, 50, 3), np.uint8)

    def sizes(seed: int) -> list[int]:
        resize.set_random_seed(seed)
        return [resize(image=image)["image"].shape[0] for _ in range(60)]

    shorts = sizes(0)
    assert set(shorts) <= set(range(20, 31)) and len(set(shorts)) > 5
    assert {20, 30} <= set(shorts)  # both ends inclusive
    assert sizes(0) == shorts  # reproducible from the seed
    with pytest.raises(ValueError):
        build_transforms(False, (20, 30), 1000, 0.0)


def test_hflip_twice_is_identity_on_boxes() -> None:
    flip = A.Compose([A.HorizontalFlip(p=1.0)], bbox_params=detection_bbox_params())
    image = np.zeros((50, 80, 3), np.uint8)
    boxes = np.array([[0, 0, 10, 20], [30.5, 5, 79, 50], [60, 10, 80, 11]], np.float32)
    once = flip(image=image, bboxes=boxes, labels=np.arange(3))
    expected_once = np.stack([80 - boxes[:, 2], boxes[:, 1], 80 - boxes[:, 0], boxes[:, 3]], axis=1)
    assert np.allclose(once["bboxes"], expected_once, atol=1e-3)
    twice = flip(image=once["image"], bboxes=once["bboxes"], labels=once["labels"])
    assert np.allclose(twice["bboxes"], boxes, atol=1e-3)
    assert np.asarray(twice["labels"]).tolist() == [0, 1, 2]
    assert np.array_equal(twice["image"], image)


def test_train_transform_flip_moves_boxes_with_pixels() -> None:
    t = build_transforms(True, 40, 1000, flip_prob=1.0)
    image = np.zeros((40, 60, 3), np.uint8)
    image[5:15, 2:12] = 255
    out = t(image=image, bboxes=np.array([[2, 5, 12, 15]], np.float32), labels=np.array([0]))
    assert np.allclose(out["bboxes"], [[48, 5, 58, 15]], atol=1e-3)
    bright = (out["image"][0] > 0).nonzero()
    assert bright[:, 1].min().item() == 48 and bright[:, 1].max().item() == 57


# --------------------------------------------------------------------------- collate


def test_collate_pads_to_multiple_of_32_with_zeros() -> None:
    a, b = torch.randn(3, 50, 70), torch.randn(3, 65, 40)
    ta = {"boxes": torch.zeros(0, 4), "image_size": (50, 70)}
    tb = {"boxes": torch.ones(1, 4), "image_size": (65, 40)}
    images, targets = collate([(a, ta), (b, tb)], size_divisor=32)
    assert images.shape == (2, 3, 96, 96)
    assert torch.equal(images[0, :, :50, :70], a) and torch.equal(images[1, :, :65, :40], b)
    assert images[0, :, 50:].abs().sum() == 0 and images[0, :, :, 70:].abs().sum() == 0
    assert images[1, :, 65:].abs().sum() == 0 and images[1, :, :, 40:].abs().sum() == 0
    assert targets[0] is ta and targets[1]["image_size"] == (65, 40)
    assert collate([(torch.ones(3, 64, 33), ta)], size_divisor=32)[0].shape == (1, 3, 64, 64)


# --------------------------------------------------------------------------- samplers


def _ratios(n: int, seed: int = 0) -> list[float]:
    return np.random.default_rng(seed).choice([0.5, 0.75, 1.0, 1.5], size=n).tolist()


def _epoch(sampler: GroupedBatchSampler, epoch: int, skip: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch, skip_batches=skip)
    return [[int(i) for i in batch] for batch in sampler]


def test_grouped_sampler_covers_each_index_once_homogeneous() -> None:
    ratios = _ratios(103)
    sampler = GroupedBatchSampler(ratios, batch_size=4, seed=1, num_replicas=1, rank=0)
    batches = _epoch(sampler, 0)
    assert len(batches) == len(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(103))
    for b in batches:
        assert 1 <= len(b) <= 4
        assert len({ratios[i] >= 1 for i in b}) == 1  # one orientation per batch
    assert sum(len(b) < 4 for b in batches) <= 2  # only each group's leftover is short


def test_grouped_sampler_deterministic_and_epoch_dependent() -> None:
    ratios = _ratios(64)
    s1 = GroupedBatchSampler(ratios, 4, seed=5, num_replicas=1, rank=0)
    s2 = GroupedBatchSampler(ratios, 4, seed=5, num_replicas=1, rank=0)
    assert _epoch(s1, 3) == _epoch(s2, 3)
    assert _epoch(s1, 3) != _epoch(s1, 4)
    assert _epoch(s1, 3) != _epoch(
        GroupedBatchSampler(ratios, 4, seed=6, num_replicas=1, rank=0), 3
    )
    # Augmentation seeds travel with the indices and are reproducible too.
    s1.set_epoch(3)
    s2.set_epoch(3)
    seeds1 = [i.seed for b in s1 for i in b]
    seeds2 = [i.seed for b in s2 for i in b]
    assert seeds1 == seeds2


@pytest.mark.parametrize(
    ("n", "world", "drop_last"), [(103, 3, False), (100, 4, False), (103, 3, True), (2, 4, False)]
)
def test_grouped_sampler_distributed_disjoint_and_covering(
    n: int, world: int, drop_last: bool
) -> None:
    ratios = _ratios(n)
    samplers = [
        GroupedBatchSampler(ratios, 4, seed=2, num_replicas=world, rank=r, drop_last=drop_last)
        for r in range(world)
    ]
    per_rank = [_epoch(s, 1) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1  # equal step counts: DDP never deadlocks
    assert all(len(b) == len(s) for b, s in zip(per_rank, samplers, strict=True))
    flat = [i for batches in per_rank for b in batches for i in b]
    if n < world:  # fewer samples than ranks: padding by repetition is unavoidable
        assert set(flat) == set(range(n))
    elif drop_last:
        assert len(flat) == len(set(flat))  # disjoint, only leftovers missing
        assert all(len(b) == 4 for batches in per_rank for b in batches)
    else:
        assert sorted(flat) == list(range(n))  # disjoint and covering
    for batches in per_rank:
        for b in batches:
            assert len({ratios[i] >= 1 for i in b}) == 1


def test_grouped_sampler_skip_batches_resumes_exactly() -> None:
    for world in (1, 2):
        sampler = GroupedBatchSampler(_ratios(50), 4, seed=0, num_replicas=world, rank=world - 1)
        full = _epoch(sampler, 2)
        assert _epoch(sampler, 2, skip=3) == full[3:]
        assert len(sampler) == len(full)  # len stays the full epoch length
        assert _epoch(sampler, 2) == full  # the skip applied to one iteration only


def test_seeded_index_is_an_int_and_pickles() -> None:
    idx = SeededIndex(7, 1234)
    assert idx == 7 and [10, 11, 12, 13, 14, 15, 16, 17][idx] == 17
    back = pickle.loads(pickle.dumps(idx))
    assert back == 7 and back.seed == 1234 and isinstance(back, SeededIndex)


def test_shard_sampler_contiguous_disjoint() -> None:
    shards = [list(ShardSampler(10, num_replicas=3, rank=r)) for r in range(3)]
    assert [i for s in shards for i in s] == list(range(10))
    assert [len(s) for s in shards] == [3, 3, 4]


# --------------------------------------------------------------------------- build_dataloader


def _first_batches(
    loader: torch.utils.data.DataLoader, epoch: int, skip: int = 0, n: int = 2
) -> list:
    loader.batch_sampler.set_epoch(epoch, skip_batches=skip)
    out = []
    for images, targets in loader:
        out.append((images, targets))
        if len(out) == n:
            break
    return out


def _same(a: list, b: list) -> bool:
    return all(
        torch.equal(ia, ib)
        and all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(ta, tb, strict=True))
        for (ia, ta), (ib, tb) in zip(a, b, strict=True)
    )


def test_build_dataloader_train_reproducible_across_workers_and_resume(
    synthetic: dict[str, Path],
) -> None:
    ds = CocoDetection(
        synthetic["train_images"],
        synthetic["train_ann"],
        build_transforms(True, (64, 96), 160, 0.5),
    )
    loader0 = build_dataloader(ds, 2, num_workers=0, train=True, seed=3, distributed=False,
                               size_divisor=32)
    reference = _first_batches(loader0, epoch=1, n=3)
    images, targets = reference[0]
    assert (
        images.shape[0] == len(targets) and images.shape[2] % 32 == 0 and images.shape[3] % 32 == 0
    )
    for t in targets:
        h, w = t["image_size"]
        assert 64 <= min(h, w) <= 96 and t["boxes"].shape[1] == 4
    assert _same(_first_batches(loader0, epoch=1, n=3), reference)  # same epoch, same data
    assert not _same(_first_batches(loader0, epoch=2, n=3), reference)
    assert _same(_first_batches(loader0, epoch=1, skip=1, n=2), reference[1:])  # resume mid-epoch
    # Augmentations are keyed by (seed, epoch, index), so worker processes change nothing.
    loader2 = build_dataloader(ds, 2, num_workers=2, train=True, seed=3, distributed=False,
                               size_divisor=32)
    assert loader2.persistent_workers
    assert _same(_first_batches(loader2, epoch=1, n=3), reference)


def test_build_dataloader_val_sequential(synthetic: dict[str, Path]) -> None:
    ds = CocoDetection(
        synthetic["val_images"],
        synthetic["val_ann"],
        build_transforms(False, 64, 160, 0.0),
        filter_empty=False,
    )
    loader = build_dataloader(ds, 3, num_workers=0, train=False, seed=0, distributed=False,
                              size_divisor=32)
    ids = [t["image_id"] for _, targets in loader for t in targets]
    assert ids == ds.image_ids.tolist()
    assert loader.pin_memory == torch.cuda.is_available()
    with pytest.raises(RuntimeError):
        build_dataloader(ds, 3, num_workers=0, train=False, seed=0, distributed=True,
                         size_divisor=32)
