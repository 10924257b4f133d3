"""benchmarks/accuracy.py and benchmarks/tv_detectors.py: torchvision's FCOS/RetinaNet behind
gfldet's calling convention (no resize, boxes mapped as gfldet maps them), trained by gfldet's
trainer, and the report's statistics."""

from __future__ import annotations

import json
import signal
import sys

import pytest
import torch
from conftest import ROOT, tiny_overrides

from gfldet.config import load_config
from gfldet.data import build_dataloader, normalize_batch, rescale_size
from gfldet.engine.build import build_dataset, build_model
from gfldet.engine.checkpoint import load_checkpoint

sys.path.insert(0, str(ROOT / "benchmarks"))  # scripts, not a package (as `python benchmarks/x.py`)
import accuracy  # noqa: E402
from tv_detectors import build_torchvision_detector, resize_scale, to_original  # noqa: E402

DEMO = str(ROOT / "configs" / "demo_synthetic_cpu.yaml")


@pytest.fixture(scope="module")
def tiny_cfg(tiny_coco):
    return load_config(DEMO, tiny_overrides(tiny_coco))


def first_batch(cfg, split: str):
    train = split == "train"
    loader = build_dataloader(build_dataset(cfg, split), 4, 0, train=train, seed=0,
                              distributed=False, size_divisor=32)
    if train:
        loader.batch_sampler.set_epoch(0)
    return next(iter(loader))


@pytest.mark.parametrize("kind", ["fcos", "retinanet"])
def test_torchvision_transform_does_not_resize(tiny_cfg, kind):
    model = build_torchvision_detector(kind, tiny_cfg.model, tiny_cfg.data)
    transform = model.detector.transform
    for split in ("train", "val"):
        images, targets = first_batch(tiny_cfg, split)
        sizes = [tuple(t["image_size"]) for t in targets]
        images = normalize_batch(images, sizes)  # what the trainer hands the model
        crops = [img[:, :h, :w] for img, (h, w) in zip(images, sizes, strict=True)]
        transform.train(split == "train")
        batch, _ = transform(crops)
        assert batch.image_sizes == sizes, split
        # Same normalisation (none) and padding as the loader's collate: the very same tensor.
        assert torch.equal(batch.tensors, images), split

    # Training never resizes, even a size the test-time resize would change.
    transform.train()
    odd = torch.rand(3, 100, 130)
    assert resize_scale(transform, 100, 130) != 1.0
    assert transform([odd])[0].image_sizes == [(100, 130)]

    # Test time: every size the loader's keep-ratio resize can produce is a fixed point, for this
    # config's sizes and the demo's; a few are pushed through the transform itself.
    transform.eval()
    gen = torch.Generator().manual_seed(0)
    sizes = ((tiny_cfg.data.test_short_side, tiny_cfg.data.max_size), (256, 384), (800, 1333))
    for short_side, max_size in sizes:
        transform.min_size, transform.max_size = (short_side,), max_size
        for h, w in torch.randint(16, 2000, (500, 2), generator=gen).tolist():
            assert resize_scale(transform, *rescale_size(h, w, short_side, max_size)) == 1.0, (h, w)
        for h, w in torch.randint(16, 600, (5, 2), generator=gen).tolist():
            image = torch.rand(3, *rescale_size(h, w, short_side, max_size), generator=gen)
            out = transform([image])[0]
            assert out.image_sizes == [tuple(image.shape[1:])]
            assert torch.equal(out.tensors[0, :, : image.shape[1], : image.shape[2]], image)


def test_to_original_clips_then_rescales_each_axis():
    det = {
        "boxes": torch.tensor([[-5.0, 10.0, 170.0, 90.0], [160.0, 10.0, 200.0, 20.0],
                               [30.0, -8.0, 60.0, 120.0]]),
        "scores": torch.tensor([0.9, 0.8, 0.7]),
        "labels": torch.tensor([1, 2, 3]),
    }
    # resized (h, w) = (100, 150), original (200, 450): x * 3, y * 2
    out = to_original(det, (100, 150), (200, 450))
    expected = torch.tensor([[0.0, 20.0, 450.0, 180.0], [90.0, 0.0, 180.0, 200.0]])
    assert torch.equal(out["boxes"], expected)  # the box entirely right of the image is dropped
    assert out["scores"].tolist() == pytest.approx([0.9, 0.7]) and out["labels"].tolist() == [1, 3]


def test_eval_boxes_are_torchvision_boxes_mapped_like_gfldet(tiny_cfg):
    torch.manual_seed(0)
    model = build_torchvision_detector("fcos", tiny_cfg.model, tiny_cfg.data).eval()
    head = model.detector.head
    with torch.no_grad():  # scores ~0.5 everywhere and boxes of 2 anchor sizes: many, some clipped
        head.classification_head.cls_logits.weight.zero_()
        head.classification_head.cls_logits.bias.zero_()
        head.regression_head.bbox_reg.bias.fill_(2.0)
    # Both padded (to 128 x 192), both sizes as the loader makes them (short side 128 or long 192).
    images = torch.zeros(2, 3, 128, 192)
    images[0, :, :, :160] = torch.randn(3, 128, 160)
    images[1, :, :96, :] = torch.randn(3, 96, 192)
    targets = [{"image_size": (128, 160), "orig_size": (64, 320)},  # y * 0.5, x * 2
               {"image_size": (96, 192), "orig_size": (300, 288)}]  # y * 3.125, x * 1.5
    with torch.no_grad():
        ours = model(images, targets)
        # torchvision as it is used
        direct = model.detector([images[0, :, :, :160], images[1, :, :96, :]])
    at_border = 0
    for det, ref, t in zip(ours, direct, targets, strict=True):
        (h, w), (oh, ow) = t["image_size"], t["orig_size"]
        boxes = ref["boxes"] * torch.tensor([ow / w, oh / h, ow / w, oh / h])
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        assert len(det["boxes"]) > 10
        torch.testing.assert_close(det["boxes"], boxes[keep])
        assert torch.equal(det["scores"], ref["scores"][keep])
        assert torch.equal(det["labels"], ref["labels"][keep])
        assert det["boxes"].min() >= 0
        assert det["boxes"][:, [0, 2]].max() <= ow and det["boxes"][:, [1, 3]].max() <= oh
        at_border += int((det["boxes"][:, 2] == ow).any()) + int((det["boxes"][:, 3] == oh).any())
    # clipped at the right or bottom edge of the image (not of the padding), then scaled
    assert at_border > 0


def test_torchvision_entrants_share_the_gfl_trunk_initialisation(tiny_cfg):
    torch.manual_seed(5)
    gfl = build_model(tiny_cfg.model, size_divisor=tiny_cfg.data.size_divisor)
    torch.manual_seed(5)
    tv = build_torchvision_detector("retinanet", tiny_cfg.model, tiny_cfg.data)
    trunk = tv.detector.backbone
    for ours, theirs in ((gfl.backbone, trunk.backbone), (gfl.neck, trunk.neck)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for tower in (tv.detector.head.classification_head, tv.detector.head.regression_head):
        assert len(tower.conv) == tiny_cfg.model.head.stacked_convs
        # Normalised towers (torchvision's v2 head): the v1 head's ReLUs died on the demo budget.
        norms = sum(isinstance(m, torch.nn.GroupNorm) for m in tower.conv.modules())
        assert norms == len(tower.conv)
    assert tv.detector.head.regression_head._loss_type == "giou"
    assert tv.detector.anchor_generator.num_anchors_per_location()[0] == 9  # the head's num_anchors


def test_retinanet_one_anchor_diagnostic_trains_with_one_square_anchor_per_location(tiny_cfg):
    tv = build_torchvision_detector("retinanet", tiny_cfg.model, tiny_cfg.data,
                                    retinanet_anchors="one_square")
    generator = tv.detector.anchor_generator
    assert generator.num_anchors_per_location() == [1] * 5
    assert [sizes[0] for sizes in generator.sizes] == [32, 64, 128, 256, 512]  # 4 strides, P3-P7
    assert generator.aspect_ratios == ((1.0,),) * 5
    num_classes = tiny_cfg.model.num_classes
    head = tv.detector.head.classification_head
    assert head.cls_logits.out_channels == num_classes  # 1 anchor x C
    images, targets = first_batch(tiny_cfg, "train")
    sizes = [tuple(t["image_size"]) for t in targets]
    losses = tv.train()(normalize_batch(images, sizes), targets)
    assert set(losses) == {"classification", "bbox_regression"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    with pytest.raises(ValueError, match="retinanet_anchors"):
        build_torchvision_detector("retinanet", tiny_cfg.model, tiny_cfg.data,
                                   retinanet_anchors="nine")


@pytest.fixture
def restore_process_state():
    """train() installs SIGTERM/SIGINT handlers; put the test process's back."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def test_fcos_trains_in_gfldet_trainer_and_is_recorded(tiny_coco, tmp_path, capsys,
                                                       restore_process_state):
    work, md = tmp_path / "acc", tmp_path / "RESULTS.md"
    # 16 images in 2 batches of 8: 2 iterations
    options = [*tiny_overrides(tiny_coco, epochs=1), "data.batch_size=8",
               "data.aspect_ratio_grouping=false", "train.deterministic=false"]
    argv = ["--config", DEMO, "--entrants", "fcos", "--seeds", "0", "--work-dir", str(work),
            "--results-md", str(md), "--cfg-options", *options]
    assert accuracy.main(argv) == 0

    run_dir = work / "fcos" / "seed0_ep1"
    state = load_checkpoint(run_dir / "last.pth")
    assert state["iteration"] == 2 and state["epoch"] == 1
    assert all(k.startswith("detector.") for k in state["model"])
    assert not (run_dir / "best.pth").exists() and not (run_dir / "epoch_1.pth").exists()
    (record,) = json.loads((work / "results.json").read_text())
    assert (record["entrant"], record["seed"], record["epochs"], record["status"]) == (
        "fcos", 0, 1, "ok")
    assert record["budget"]["iterations"] == 2 and record["budget"]["batch_size"] == 8
    assert set(record["metrics"]) == set(accuracy.METRICS)
    text = md.read_text()
    assert "| `fcos` |" in text and "not run" in text

    capsys.readouterr()
    assert accuracy.main(argv) == 0  # finished runs are skipped
    assert "recorded, skipped" in capsys.readouterr().out
    assert len(json.loads((work / "results.json").read_text())) == 1
    # Results of another config are never mixed in: refused before any training.
    assert accuracy.main([*argv, "optim.lr=0.02"]) == 2
    assert "trained with another config" in capsys.readouterr().err


def _append_many(path, name: str, count: int) -> None:
    for seed in range(count):
        accuracy.append_result({"entrant": name, "seed": seed}, path)


def test_processes_appending_to_one_results_file_keep_every_record(tmp_path):
    import multiprocessing

    path = tmp_path / "results.json"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_append_many, args=(path, name, 150)) for name in ("a", "b")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    records = json.loads(path.read_text())
    assert sorted((r["entrant"], r["seed"]) for r in records) == [
        (n, s) for n in "ab" for s in range(150)]


def record(entrant: str, seed: int, ap: float, status: str = "ok", epochs: int = 2) -> dict:
    # APl -1: pycocotools' value when there are no large objects
    metrics = dict.fromkeys(accuracy.METRICS, ap) | {"APl": -1.0}
    return {"entrant": entrant, "seed": seed, "epochs": epochs, "status": status,
            "metrics": metrics if status == "ok" else None, "wall_seconds": 600.0,
            "config": "demo.yaml", "cfg_options": [], "command": "python benchmarks/accuracy.py",
            "machine": "test machine",
            "budget": {"iterations": 500, "batch_size": 8, "train_short_side": [256, 256],
                       "test_short_side": 256, "max_size": 384, "amp": "bf16"}}


def table_rows(text: str, section: str) -> dict[str, list[str]]:
    """The rows of the table under `## {section}...`, as cells, by the cell naming the entrant."""
    part = text.split(f"## {section}")[1].split("\n## ")[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in part.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    return {next(c for c in row if c.startswith("`")): row for row in rows[1:]}


def test_report_mean_std_differences_and_missing_entrants():
    records = [
        record("gfl", 0, 0.10), record("gfl", 1, 0.12), record("gfl", 2, 0.14),
        record("fcos", 0, 0.05), record("fcos", 1, 0.07),
        record("focal_dirac", 0, 0.08),
        record("qfl_dirac", 0, 0.0, status="failed"),
        record("retinanet", 0, 0.50, epochs=1),  # another budget: not in this report
    ]
    for r in records[:5]:
        r["commit"] = "abc1234"
    text = accuracy.report(records, epochs=2, results_path="results.json")
    assert "- Runs trained at commit(s): abc1234 (5 runs); not recorded (2 runs)" in text

    # entrant, what, n, AP, AP50, AP75, APs, APm, APl, min/run
    table = table_rows(text, "All entrants")
    gfl = table["`gfl`"]
    assert gfl[2] == "3" and gfl[3:8] == ["12.0 ± 2.0"] * 5
    assert gfl[8] == "n/a" and gfl[9] == "10.0"
    assert table["`fcos`"][2:4] == ["2", "6.0 ± 1.4"]  # sample std of 5 and 7: sqrt(2)
    assert table["`focal_dirac`"][2:4] == ["1", "8.0"]
    assert table["`qfl_dirac`"][2:4] == ["0 (+1 failed)", "–"]
    assert table["`retinanet`"][2:4] == ["not run", "–"]
    assert len(table) == len(accuracy.ENTRANTS)

    versus = table_rows(text, "GFL against")  # paired by seed: seeds 0 and 1; 10 - 5 and 12 - 7
    assert versus["`gfl` − `fcos`"][1:3] == ["2", "+5.0 ± 0.0"]
    assert versus["`gfl` − `retinanet`"][1] == "not run"

    ablation = table_rows(text, "Ablation")  # Table 3 layout: QFL, DFL, entrant, n, AP, ...
    assert list(ablation) == ["`focal_dirac`", "`qfl_dirac`", "`focal_dfl`", "`gfl`", "`qfl_nodfl`"]
    assert ablation["`focal_dirac`"][:5] == ["", "", "`focal_dirac`", "1", "8.0"]
    assert ablation["`qfl_dirac`"][:4] == ["✓", "", "`qfl_dirac`", "0 (+1 failed)"]
    assert ablation["`focal_dfl`"][:4] == ["", "✓", "`focal_dfl`", "not run"]
    assert ablation["`gfl`"][:5] == ["✓", "✓", "`gfl`", "3", "12.0 ± 2.0"]
    assert "500 iterations × 8 images (4,000 images)" in text and "Seeds: 0 1 2" in text

    anchors = table_rows(text, "RetinaNet's anchors")  # paired by seed, this budget only
    assert anchors["`retinanet_one_anchor` − `retinanet`"][1] == "not run"
    more = [record("retinanet", 0, 0.06), record("retinanet", 1, 0.05),
            record("retinanet_one_anchor", 1, 0.25)]
    text = accuracy.report(records + more, epochs=2, results_path="results.json")
    anchors = table_rows(text, "RetinaNet's anchors")
    assert anchors["`retinanet_one_anchor` − `retinanet`"][1:3] == ["1", "+20.0"]
