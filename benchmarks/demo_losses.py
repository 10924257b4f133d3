"""The demo's first N training iterations, exactly: every loss term of every iteration as a
float hex string, a digest of them, and a digest of the weights after the N-th update, to show
that a change (a refactor, a rename) keeps the demo's numerics bit for bit.

Run it on two checkouts from the same folder (the bundled data is generated there once, the same
way for both) and compare the output:

    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before python benchmarks/demo_losses.py --root /tmp/before > before.txt
    python benchmarks/demo_losses.py > after.txt
    diff before.txt after.txt && echo bit-identical

It trains `configs/demo_synthetic_cpu.yaml` of `--root` as the README's first command does
(same seed, data order, precision choice), in a temporary run folder, and stops before the
(N+1)-th forward pass. Thread count and CPU change the numbers: compare on one machine.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Enough(BaseException):  # a BaseException: the trainer's own error handling lets it through
    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="the checkout whose demo config is run")
    parser.add_argument("--iters", type=int, default=20, help="training iterations to record")
    args = parser.parse_args(argv)

    import torch

    from gfldet.config import load_config
    from gfldet.engine import trainer

    cfg = load_config(args.root / "configs" / "demo_synthetic_cpu.yaml",
                      ["train.report=false", "train.eval_interval=0"])
    rows: list[str] = []
    weights: list[str] = []

    def record(module, inputs, losses):
        if not module.training:
            return
        if len(rows) == args.iters:  # the N-th update is done: the weights it left, then stop
            digest = hashlib.sha256()
            for tensor in module.state_dict().values():  # registration order, names left out
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            weights.append(digest.hexdigest()[:16])
            raise Enough
        rows.append(" ".join(f"{k}={float(v.detach()).hex()}" for k, v in sorted(losses.items())))

    original_init = trainer.TrainLoop.__init__

    def init_with_hook(self, model, *rest, **kwargs):
        original_init(self, model, *rest, **kwargs)
        model.register_forward_hook(record)

    trainer.TrainLoop.__init__ = init_with_hook
    with tempfile.TemporaryDirectory() as tmp, contextlib.suppress(Enough):
        trainer.train(cfg, Path(tmp) / "run")
    if len(rows) != args.iters or not weights:
        print(f"error: recorded {len(rows)} of {args.iters} iterations", file=sys.stderr)
        return 1
    for i, row in enumerate(rows, 1):
        print(f"iter {i:3d} {row}")
    losses_digest = hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]
    print(f"losses of {len(rows)} iterations sha256 {losses_digest}")
    print(f"weights after iteration {len(rows)} sha256 {weights[0]} (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
