"""tools/train.py and tools/eval.py end to end on a tiny generated dataset."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_in_process, tiny_overrides

from gfldet.engine.checkpoint import load_checkpoint

TRAIN = str(ROOT / "tools" / "train.py")
EVAL = str(ROOT / "tools" / "eval.py")
DEMO = str(ROOT / "configs" / "demo_synthetic_cpu.yaml")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def run_overrides(data) -> list[str]:
    # The demo's precision (amp auto: bf16 where the CPU has it natively, fp32 elsewhere, as
    # emulated bf16 is several times slower) and channels_last, the numerics tools/eval.py must
    # reproduce; and every detection kept (score_thr 0), so that the AP of a barely trained model
    # is not 0 and "the same AP" is a real check.
    return [*tiny_overrides(data), "train.amp=auto", "train.channels_last=true",
            "model.test.score_thr=0.0"]


@pytest.fixture(scope="module")
def trained_run(tiny_coco, tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    proc = run(TRAIN, DEMO, "--work-dir", str(work), "--cfg-options", *run_overrides(tiny_coco))
    return work, proc


def test_training_writes_checkpoints_log_tensorboard_and_config(trained_run, tiny_coco):
    work, proc = trained_run
    for name in ("epoch_1.pth", "epoch_2.pth", "last.pth", "best.pth", "config.yaml", "train.log",
                 "metrics_epoch_2.json"):
        assert (work / name).is_file(), name
    assert list((work / "tb").glob("events.out.tfevents.*"))
    log = (work / "train.log").read_text()
    assert "loss_cls" in log and "img/s" in log and "eta" in log
    assert "final bbox AP" in proc.stdout
    state = load_checkpoint(work / "last.pth")
    assert {"model", "optimizer", "scheduler", "scaler", "ema", "epoch", "iteration", "rng",
            "config"} <= set(state)
    assert state["epoch"] == 2 and state["config"]["schedule"]["epochs"] == 2
    # Class names travel with the weights (label order = sorted category id), so a checkpoint
    # still names its classes once the annotation files are gone.
    categories = json.loads(tiny_coco["train_ann"].read_text())["categories"]
    by_id = sorted(categories, key=lambda c: c["id"])
    assert state["meta"]["class_names"] == [c["name"] for c in by_id]
    # The resolved config is a complete, loadable config equal to what was trained.
    from gfldet.config import load_config

    assert load_config(work / "config.yaml").data.batch_size == 4


def test_a_training_checkpoint_names_its_classes_without_the_annotation_files(trained_run,
                                                                              tmp_path):
    from gfldet.engine.checkpoint import save_checkpoint
    from gfldet.inference import Detector

    work, _ = trained_run
    state = load_checkpoint(work / "last.pth")
    for split in ("train", "val"):  # the dataset moved away after training
        state["config"]["data"][split]["annotations"] = str(tmp_path / "gone" / f"{split}.json")
    moved = save_checkpoint(state, tmp_path / "moved.pth")
    assert Detector.from_checkpoint(moved).class_names == state["meta"]["class_names"]


def test_eval_reproduces_the_training_ap(trained_run, tiny_coco, tmp_path):
    work, _ = trained_run
    out = tmp_path / "dets.json"
    proc = run_in_process(EVAL, str(work / "config.yaml"), str(work / "last.pth"), "--out",
                          str(out), "--metrics", str(tmp_path / "m.json"))
    summary = [line for line in proc.stdout.splitlines() if line.startswith(" Average ")]
    assert len(summary) == 12
    assert "category" in proc.stdout  # per-class table
    metrics = json.loads((tmp_path / "m.json").read_text())
    trained = json.loads((work / "metrics_epoch_2.json").read_text())
    assert trained["bbox_mAP"] > 0 and trained["AR_100"] > 0
    for key in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "AR_100"):
        assert metrics[key] == pytest.approx(trained[key], abs=1e-9), key
    assert isinstance(json.loads(out.read_text()), list)


def test_eval_refuses_a_val_file_whose_classes_differ_from_the_checkpoints(trained_run,
                                                                           tiny_coco, tmp_path):
    # Two category ids swapped by a re-export: every label would be scored as the other class.
    work, _ = trained_run
    data = json.loads(tiny_coco["val_ann"].read_text())
    first, second = sorted(data["categories"], key=lambda c: c["id"])[:2]
    first["name"], second["name"] = second["name"], first["name"]
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps(data))
    metrics = tmp_path / "m.json"
    proc = run_in_process(EVAL, str(work / "last.pth"), "--metrics", str(metrics), "--cfg-options",
                          f"data.val.annotations={swapped}", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and not metrics.exists()
    assert str(swapped) in proc.stderr and "nothing was evaluated" in proc.stderr
    trained = load_checkpoint(work / "last.pth")["meta"]["class_names"]
    assert str(trained) in proc.stderr and str(trained) != str(
        [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])])


def test_eval_of_a_missing_val_file_says_nothing_was_evaluated_and_how_to_name_one(trained_run,
                                                                                   tmp_path):
    work, _ = trained_run
    proc = run_in_process(EVAL, str(work / "last.pth"), "--cfg-options",
                          "data.val.annotations=gone/val.json", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for words in ("data.val.annotations", "nothing was evaluated", "stored config",
                  "--cfg-options data.val.images=DIR data.val.annotations=FILE"):
        assert words in proc.stderr, words
    assert "nothing was trained" not in proc.stderr and "check_dataset.py" not in proc.stderr


def test_eval_with_faster_coco_eval_matches_pycocotools(trained_run, tmp_path):
    pytest.importorskip("faster_coco_eval")
    work, _ = trained_run
    proc = run_in_process(EVAL, str(work / "config.yaml"), str(work / "last.pth"), "--backend",
                          "faster_coco_eval", "--metrics", str(tmp_path / "fast.json"))
    # faster-coco-eval's summary has AR@.5/AR@.75 lines after the 12 standard ones: it really ran.
    assert len([line for line in proc.stdout.splitlines() if line.startswith(" Average ")]) > 12
    fast = json.loads((tmp_path / "fast.json").read_text())
    reference = json.loads((work / "metrics_epoch_2.json").read_text())  # scored by pycocotools
    assert reference["bbox_mAP"] > 0
    for key, value in reference.items():
        if isinstance(value, float):
            assert fast[key] == pytest.approx(value, abs=1e-4), key


def test_eval_without_faster_coco_eval_fails_before_predicting(monkeypatch, capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("gfldet_tools_eval", EVAL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import now raises ImportError
    with pytest.raises(SystemExit) as exc:
        module.main([str(tmp_path / "missing.yaml"), "x.pth", "--backend", "faster_coco_eval"])
    assert exc.value.code == 2
    assert "pip install faster-coco-eval" in capsys.readouterr().err


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(trained_run, tiny_coco, tmp_path):
    work, _ = trained_run
    # Stop after epoch 1 (a 1-epoch run has a different schedule, so copy the 2-epoch run's
    # epoch-1 checkpoint into a fresh folder instead) and resume to the end.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "last.pth").write_bytes((work / "epoch_1.pth").read_bytes())
    shutil.copytree(work / "dataset_check", resumed / "dataset_check")  # the run's check cache
    run(TRAIN, DEMO, "--work-dir", str(resumed), "--resume", "--cfg-options",
        *run_overrides(tiny_coco))
    a = load_checkpoint(work / "last.pth")["model"]
    b = load_checkpoint(resumed / "last.pth")["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run diverged from the whole one"
    # The resume decoded no image for the check: every result came from the cache, as logged.
    first_log, resumed_log = (work / "train.log").read_text(), (resumed / "train.log").read_text()
    for split, n in (("train", 16), ("val", 4)):
        assert (f"{n} image files decoded (no check cache yet; writing "
                f"{work / 'dataset_check' / split}.json)") in first_log
        assert (f"0 image files decoded, {n} unchanged since their last full decode (checked "
                f"index {resumed / 'dataset_check' / split}.index.npz: the annotation file and "
                f"all {n} image files are unchanged") in resumed_log


def test_a_diverged_run_with_loader_workers_exits_with_its_message(tiny_coco, tmp_path):
    # Loader workers ignore SIGTERM (a scancel must not kill them before the checkpoint), and
    # multiprocessing's exit handler waited forever for them when an error left the loop.
    overrides = [o for o in tiny_overrides(tiny_coco) if not o.startswith("data.num_workers")]
    proc = subprocess.run(
        [sys.executable, TRAIN, DEMO, "--work-dir", str(tmp_path / "run"), "--cfg-options",
         *overrides, "data.num_workers=2", "optim.lr=1e6", "train.max_bad_steps=2"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: 2 consecutive non-finite steps" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("tool", ["eval.py", "export.py"])
def test_usage_names_one_checkpoint(tool):
    # argparse's own usage for nargs="+" read "[CONFIG] CHECKPOINT [[CONFIG] CHECKPOINT ...]".
    proc = run_in_process(str(ROOT / "tools" / tool), "a.pth", "b.pth", "c.pth", check=False)
    assert proc.returncode == 2
    assert "[CONFIG] CHECKPOINT " in proc.stderr and "(one checkpoint;" in proc.stderr
    assert "[[" not in proc.stderr


def test_misspelt_key_is_named(tiny_coco, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"base: {DEMO}\noptim:\n  lrr: 0.1\n")
    proc = run_in_process(TRAIN, str(cfg), check=False)
    assert proc.returncode == 2
    assert "optim.lrr" in proc.stderr and "optim.lr" in proc.stderr


def test_overrides_are_type_checked(tmp_path):
    proc = run_in_process(TRAIN, DEMO, "--cfg-options", "optim.lr=fast", check=False)
    assert proc.returncode == 2 and "optim.lr" in proc.stderr and "float" in proc.stderr
