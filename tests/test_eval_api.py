"""`evaluate_checkpoint`: tools/eval.py from Python, one call and the same numbers (trial F
finding 7: rebuilt from the internals, evaluation ran in fp32 without channels_last)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, run_in_process, tiny_overrides

from gfldet.config import ConfigError, load_config
from gfldet.data.images import DatasetError
from gfldet.engine.checkpoint import CheckpointError
from gfldet.engine.evaluator import evaluate_checkpoint
from gfldet.engine.trainer import train
from gfldet.inference import Detector

EVAL = str(ROOT / "tools" / "eval.py")
DEMO = str(ROOT / "configs" / "demo_synthetic_cpu.yaml")


@pytest.fixture(scope="module")
def checkpoint(tiny_coco, tmp_path_factory) -> Path:
    """A 1-epoch tiny run whose evaluation depends on the precision and memory format: amp auto
    (bf16 on a CPU that has it), channels_last, every detection kept (score_thr 0, so the AP of
    a barely trained model is not 0)."""
    work = tmp_path_factory.mktemp("eval_api") / "run"
    cfg = load_config(DEMO, [*tiny_overrides(tiny_coco, epochs=1), "train.amp=auto",
                             "train.channels_last=true", "model.test.score_thr=0.0"])
    train(cfg, work)
    return work / "last.pth"


def test_evaluate_checkpoint_gives_tools_eval_metrics_bit_for_bit(checkpoint, tmp_path):
    run_in_process(EVAL, str(checkpoint), "--metrics", str(tmp_path / "m.json"), "--out",
                   str(tmp_path / "d.json"))
    result = evaluate_checkpoint(checkpoint)
    trained = json.loads((checkpoint.parent / "metrics_epoch_1.json").read_text())
    assert result.metrics["bbox_mAP"] > 0 and result.metrics["bbox_mAP"] == trained["bbox_mAP"]
    assert json.loads(json.dumps(result.metrics)) == json.loads((tmp_path / "m.json").read_text())
    assert result.detections == json.loads((tmp_path / "d.json").read_text())
    assert result.coco_eval is None and result.cfg.train.channels_last
    assert result.state["meta"]["class_names"] == result.dataset.class_names
    # A Config object (as train() takes) evaluates as its YAML does.
    again = evaluate_checkpoint(checkpoint, load_config(checkpoint.parent / "config.yaml"))
    assert again.metrics == result.metrics


def test_evaluate_checkpoint_of_a_wrong_path_names_it(checkpoint, tmp_path):
    not_one = checkpoint.parent / "config.yaml"  # a file, but no checkpoint
    with pytest.raises(CheckpointError, match=str(not_one)):
        evaluate_checkpoint(not_one)
    # A missing file is FileNotFoundError, as from load_checkpoint and Detector.from_checkpoint,
    # naming the checkpoints that are there.
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing.pth'}"):
        evaluate_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="available in .*last.pth"):
        evaluate_checkpoint(checkpoint.parent / "lats.pth")


def test_evaluate_checkpoint_refuses_a_val_file_with_other_classes(checkpoint, tiny_coco,
                                                                   tmp_path):
    data = json.loads(tiny_coco["val_ann"].read_text())
    first, second = sorted(data["categories"], key=lambda c: c["id"])[:2]
    first["name"], second["name"] = second["name"], first["name"]
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="nothing was evaluated") as err:
        evaluate_checkpoint(checkpoint, overrides=[f"data.val.annotations={swapped}"])
    assert str(swapped) in str(err.value)


def test_evaluate_checkpoint_names_a_bad_override_and_how_to_name_val_files(checkpoint):
    with pytest.raises(ConfigError, match="unknown key 'bad'"):
        evaluate_checkpoint(checkpoint, overrides=["bad.key=1"])
    with pytest.raises(ConfigError, match="data.val_batch_sise.*val_batch_size"):
        evaluate_checkpoint(checkpoint, checkpoint.parent / "config.yaml",
                            overrides=["data.val_batch_sise=1"])
    # The advice of a missing val file names the Python argument, not the tool's option.
    with pytest.raises(DatasetError) as err:
        evaluate_checkpoint(checkpoint, overrides=["data.val.annotations=gone/val.json"])
    assert "stored config" in str(err.value) and "overrides=['data.val.images=DIR'" in str(
        err.value) and "--cfg-options data.val.images=DIR" not in str(err.value)


def test_a_config_object_takes_overrides_and_is_checked_in_detector_too(checkpoint):
    cfg = load_config(checkpoint.parent / "config.yaml")
    detector = Detector.from_checkpoint(checkpoint, cfg, overrides=["model.test.score_thr=0.75"])
    assert detector.score_thr == 0.75  # not silently the Config's 0.0
    cfg.schedule.epoch = 2  # a misspelt attribute is named, as train() names it
    with pytest.raises(ConfigError, match="did you mean 'schedule.epochs'"):
        Detector.from_checkpoint(checkpoint, cfg)


def test_an_mmdetection_checkpoint_is_told_to_be_converted_everywhere(checkpoint, tmp_path):
    """Trial G finding 5: an unconverted MMDetection file got "stores no config", and with a
    config "drop the override": advice in a circle, never naming MMDetection."""
    import torch

    state = torch.load(checkpoint, weights_only=True)
    layout = {("bbox_" + k if k.startswith("head.") else k): v for k, v in state["model"].items()}
    mmdet = tmp_path / "gfl_mmdet.pth"
    torch.save({"state_dict": layout, "meta": {"CLASSES": ("a", "b")}}, mmdet)
    advice = f"{mmdet} is an MMDetection checkpoint: convert it first: python " \
             f"tools/convert_mmdet.py {mmdet} OUT.pth"
    yaml = checkpoint.parent / "config.yaml"
    for call in (lambda: Detector.from_checkpoint(mmdet), lambda: evaluate_checkpoint(mmdet),
                 lambda: Detector.from_checkpoint(mmdet, config=yaml),
                 lambda: evaluate_checkpoint(mmdet, config=yaml)):
        with pytest.raises(CheckpointError, match=advice.replace(".", r"\.")):
            call()
    proc = run_in_process(EVAL, str(yaml), str(mmdet), check=False)
    assert proc.returncode == 2 and advice in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    # As load_from= (MMDetection's fine-tuning habit) it left the whole head at its init.
    with pytest.raises(CheckpointError, match=advice.replace(".", r"\.")):
        train(load_config(yaml), tmp_path / "finetune", load_from=str(mmdet))
