"""Train a GFL detector from a YAML config.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT] | --overwrite]
        [--cfg-options a.b=c ...]

The run folder (default work_dirs/<config name>) must not hold another run: continue one with
--resume, or delete its outputs and start again with --overwrite.
    torchrun --nproc_per_node 8 tools/train.py CONFIG          # several GPUs (or CPU processes)

Exit code: 0 done; 2 bad input (config, data, checkpoint, run folder: a message says which and
what to do, before anything is trained); 128 + N stopped by signal N (SIGTERM 143 and Ctrl-C 130
write last.pth first; a second Ctrl-C stops at once).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from gfldet.config import ConfigError, load_config_or_exit
from gfldet.data.images import DatasetError
from gfldet.engine.checkpoint import CheckpointError, find_latest_checkpoint
from gfldet.engine.run_dir import RunDirError
from gfldet.engine.trainer import TrainingStopped, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--work-dir",
                        help="run folder (default: train.work_dir or work_dirs/<config name>)")
    parser.add_argument("--resume", nargs="?", const=True, default=None,
                        help="continue from CKPT, or from the run folder's latest checkpoint when "
                             "no path is given")
    parser.add_argument("--overwrite", action="store_true",
                        help="the run folder holds an earlier run: delete that run's outputs "
                             "(checkpoints, logs, scalars, metrics) and start again. Without it "
                             "such a folder is refused")
    parser.add_argument("--allow-schedule-change", action="store_true",
                        help="with --resume: continue on the config's schedule even if it differs "
                             "from the checkpoint's")
    parser.add_argument("--load-from",
                        help="initialise from a checkpoint's weights where they match "
                             "(fine-tuning)")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config values, e.g. optim.lr=0.005 "
                             "schedule.milestones=[16,22]")
    return parser.parse_args(argv)


def work_dir_for(config_path: str, cli_work_dir: str | None, cfg_work_dir: str | None) -> Path:
    return Path(cli_work_dir or cfg_work_dir or Path("work_dirs") / Path(config_path).stem)


@record  # under torchrun, the failing rank's traceback is the error shown
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config_or_exit(args.config, args.cfg_options)
    work_dir = work_dir_for(args.config, args.work_dir, cfg.train.work_dir)
    try:
        metrics, _ = train(cfg, work_dir, args.resume, args.load_from, args.allow_schedule_change,
                           overwrite=args.overwrite)
    except (ConfigError, DatasetError, CheckpointError, RunDirError) as err:  # a message, no trace
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # the run diverged: its message says what to change
        print(f"error: {err}", file=sys.stderr)
        return 1
    except TrainingStopped as stop:  # last.pth written; the log said so
        return 128 + stop.signum  # the shell's convention for "ended by signal N"
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one during it
        latest = find_latest_checkpoint(work_dir)
        where = (f"the last complete checkpoint is {latest} (continue with --resume)" if latest
                 else f"{work_dir} holds no checkpoint of it")
        if os.environ.get("RANK", "0") == "0":  # one line under torchrun, group or not
            print("interrupted: a second Ctrl-C (or one before training started) stopped the run "
                  f"at once; {where}", file=sys.stderr)
        return 128 + signal.SIGINT
    if metrics:
        print(f"final bbox AP: {metrics['bbox_mAP']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
