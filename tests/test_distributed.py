"""Distributed training on CPU (gloo): the loss normalisers are averaged across processes, so two
processes on half a batch each produce exactly the gradient of one process on the whole batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, build_from_options, exit_worker, join_gloo, spawn_workers, tiny_overrides

from gfldet.data import checks


def make_model():
    torch.manual_seed(0)
    # Frozen BN statistics: BatchNorm over half a batch would differ from the whole batch.
    model = build_from_options(
        "model.num_classes=3", "model.backbone.depth=18", "model.backbone.frozen_stages=-1",
        "model.fpn.out_channels=32", "model.head.feat_channels=64", "model.head.stacked_convs=1")
    # Confident scores make the box-loss normaliser (the sum of the max scores of the positives)
    # exceed 1 on each process; below 1 its clamp at 1 (MMDetection's, for batches with no
    # positives) applies per process and the two setups legitimately differ.
    torch.nn.init.constant_(model.head.gfl_cls.bias, 3.0)
    return model


def make_batch():
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 96, 96, generator=gen)
    # Unequal box counts per image, so per-process positives differ.
    boxes = [
        torch.tensor([[5.0, 5, 60, 70], [40, 30, 90, 90], [10, 50, 30, 80]]),
        torch.tensor([[20.0, 10, 50, 40]]),
        torch.zeros(0, 4),
        torch.tensor([[0.0, 0, 90, 90], [30, 30, 60, 60]]),
    ]
    targets = [{"boxes": b, "labels": torch.arange(len(b)) % 3} for b in boxes]
    return images, targets


def _worker(rank: int, world: int, port: int, out: str) -> None:
    join_gloo(rank, world, port)
    model = torch.nn.parallel.DistributedDataParallel(make_model().train())
    images, targets = make_batch()
    half = slice(rank * 2, rank * 2 + 2)
    losses = model(images[half], targets[half])
    sum(losses.values()).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters() if p.grad is not None},
                   out)
    exit_worker()


def test_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    out = str(tmp_path / "grads.pt")
    port = 29500 + os.getpid() % 1000
    spawn_workers(_worker, args=(2, port, out))
    ddp_grads = torch.load(out, weights_only=True)

    model = make_model().train()
    images, targets = make_batch()
    sum(model(images, targets).values()).backward()
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert single.keys() == ddp_grads.keys()
    for name, grad in single.items():
        torch.testing.assert_close(ddp_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


VENV_TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(VENV_TORCHRUN),
                    reason="torchrun not installed")
def test_torchrun_two_cpu_processes_train(tiny_coco, tmp_path):
    torchrun = VENV_TORCHRUN
    work = tmp_path / "ddp"
    cmd = [torchrun if os.path.exists(torchrun) else "torchrun", "--nproc_per_node", "2",
           "--master_port", str(30500 + os.getpid() % 1000), str(ROOT / "tools" / "train.py"),
           str(ROOT / "configs" / "demo_synthetic_cpu.yaml"), "--work-dir", str(work),
           "--cfg-options", *tiny_overrides(tiny_coco, epochs=1), "data.batch_size=2",
           "optim.reference_batch_size=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (work / "train.log").read_text()
    assert "2 process(es)" in log
    # 2 images per process and 2 processes: a total batch of 4 against the config's 8.
    assert ("lr scaled linearly from 0.01 (for a total batch of 8) to 0.005 for a total batch "
            "of 4") in log
    # Each process takes half of the 16 images: 4 batches of 2, or 5 when the aspect-ratio
    # groups leave a partial batch.
    iters = int(log.split(" iterations per epoch")[0].split()[-1])
    assert iters in (4, 5)
    assert (work / "last.pth").is_file() and "final bbox AP" in proc.stdout


def _report_facts(report: checks.DatasetReport) -> dict:
    return {"fatal": report.fatal, "fixed": dict(report.fixed),
            "examples": dict(report.fix_examples), "warnings": report.warnings,
            "annotations": report.annotations,
            "raw_orientation_ids": sorted(report.raw_orientation_ids),
            "decoded": report.images_decoded}


def _check_worker(rank: int, world: int, port: int, image_dir: str, ann_file: str,
                  out: str) -> None:
    join_gloo(rank, world, port)
    probed: list[str] = []
    real_probe = checks._probe

    def counting_probe(path, max_pixels):
        probed.append(path.name)
        return real_probe(path, max_pixels)

    checks._probe = counting_probe
    from gfldet.distributed import all_gather_objects

    shard = checks.ShardedCheck(rank, world, all_gather_objects)
    report = checks.check_dataset(image_dir, ann_file, shard=shard)
    torch.save({"facts": _report_facts(report), "probed": probed}, f"{out}.{rank}")
    exit_worker()


def test_dataset_check_is_shared_between_processes(tiny_coco, tmp_path):
    """Under torchrun each process decodes half of the images, and both reach the report that one
    process decoding everything reaches (a truncated file included)."""
    image_dir = tmp_path / "images"
    shutil.copytree(tiny_coco["train_images"], image_dir)
    broken = sorted(image_dir.iterdir())[5]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    single = checks.check_dataset(image_dir, tiny_coco["train_ann"])
    assert sum(broken.name in msg for msg in single.fix_examples[checks.FIX_BAD_IMAGE]) == 1

    out = str(tmp_path / "report")
    port = 29500 + (os.getpid() + 500) % 1000
    spawn_workers(_check_worker, args=(2, port, str(image_dir), str(tiny_coco["train_ann"]), out))
    results = [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(2)]
    for result in results:
        assert result["facts"] == _report_facts(single)
    probed = [set(r["probed"]) for r in results]
    files = {p.name for p in image_dir.iterdir()}
    assert probed[0].isdisjoint(probed[1]) and probed[0] | probed[1] == files
    assert abs(len(probed[0]) - len(probed[1])) <= 1
