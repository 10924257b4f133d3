"""A fingerprint of training numerics: digests of every logged loss, the final weights and the AP
of the tests' tiny fp32 run (deterministic, CPU), to show that a change keeps numerics.

Run it on two commits and compare the lines (the data is generated the same way each time):

    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before python benchmarks/numerics_fingerprint.py --root /tmp/before
    python benchmarks/numerics_fingerprint.py

`--root` is the checkout whose configs/ and tests/conftest.py (the tiny config) are used; run it
with that checkout's gfldet importable (PYTHONPATH), as above.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="the checkout to take configs/ and tests/ from")
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs of 4 iterations, evaluated after each")
    parser.add_argument("overrides", nargs="*", help="extra --cfg-options, e.g. train.ema=true")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(args.root / "tests"))
    import torch
    from conftest import tiny_overrides  # the tests' tiny model and schedule

    from gfldet.config import load_config
    from gfldet.data import generate_synthetic_coco
    from gfldet.engine.checkpoint import load_checkpoint
    from gfldet.engine.trainer import train

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_synthetic_coco(Path(tmp) / "data", num_train=16, num_val=4,
                                       image_size=(128, 160), seed=3, num_workers=1)
        cfg = load_config(args.root / "configs" / "demo_synthetic_cpu.yaml",
                          [*tiny_overrides(data, epochs=args.epochs), "model.test.score_thr=0.0",
                           *args.overrides])
        metrics, _ = train(cfg, Path(tmp) / "run")
        records = [json.loads(line)
                   for line in (Path(tmp) / "run" / "scalars.jsonl").read_text().splitlines()]
        weights = load_checkpoint(Path(tmp) / "run" / "last.pth")["model"]
    steps = [{k: v for k, v in r.items() if k.startswith("train/loss") or k == "train/grad_norm"}
             for r in records if any(k.startswith("train/loss") for k in r)]
    aps = [r["val/bbox_mAP"] for r in records if "val/bbox_mAP" in r]
    # Tensors only, in registration order: renaming a module keeps the digest.
    weight_hash = hashlib.sha256()
    for tensor in weights.values():
        weight_hash.update(tensor.cpu().contiguous().numpy().tobytes())
    print(f"logged steps: {len(steps)}, "
          f"losses and grad norms sha256 {digest(json.dumps(steps).encode())}")
    print(f"final weights ({len(weights)} tensors) sha256 {weight_hash.hexdigest()[:16]}")
    print(f"bbox AP per epoch: {aps}; last {metrics.get('bbox_mAP')!r}")
    print(f"last step: {json.dumps(steps[-1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
