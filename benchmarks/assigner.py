"""Time and peak memory of `atss_assign` (batched over images and boxes) against a straightforward
per-image, per-box loop, for 1 to 1000 boxes per image at 800x1344 (P3-P7 priors, 22,400 per
image), batch 2, fp32, same threads.

    python benchmarks/assigner.py [--boxes 1 10 100 1000] [--batch 2] [--repeats 5] [--threads N]
        [--blocks]

Time: alternating runs in this process, medians. Peak memory: each (entrant, boxes) runs once
more in a fresh subprocess, which builds its inputs, warms up on 1 box per image, then calls the
entrant once; reported is the process's peak resident set (VmHWM, reset just before the call)
minus its resident set just before it, i.e. the extra memory the call touched at its peak. The
"exp." columns are the log-log slopes
d log(y) / d log(boxes) against the previous row: <= 1 means at most linear growth.

`--blocks` times `atss_assign` with its cache-sized CPU blocks of boxes against the same code with
one block per level (as on a GPU), alternating, and checks that the assignments are equal.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable

import torch
from common import (
    allocator_line,
    extra_peak_mib,
    machine,
    markdown_table,
    peak_in_fresh_process,
    random_boxes,
    set_threads,
    time_alternating,
    use_retaining_malloc,
)
from torch import Tensor
from torchvision.ops import box_iou

from gfldet import assigner
from gfldet.assigner import atss_assign
from gfldet.config import DataConfig, PriorsConfig
from gfldet.models.priors import Priors, make_priors, valid_prior_mask

OCTAVE_BASE_SCALE = PriorsConfig().octave_base_scale  # the recipe's (gfldet.config)
SIZE_DIVISOR = DataConfig().size_divisor  # the recipe's (gfldet.config)

LEVEL_SIZES = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]  # 800x1344 at strides 8..128
STRIDES = [8, 16, 32, 64, 128]
HEIGHT, WIDTH = 800, 1344


def loop_assign(priors: Priors, gt_boxes: Tensor, topk: int = 9) -> Tensor:
    """ATSS the obvious way (MMDetection's ATSSAssigner order): per image an [A, G] IoU matrix,
    then per box its top-k nearest priors per level, mean + std threshold, centre inside."""
    anchors, centers = priors.boxes, priors.centers
    starts = [sum(priors.num_per_level[:i]) for i in range(len(priors.num_per_level))]
    out = []
    for boxes in gt_boxes:  # one image: [G, 4]
        assigned = torch.full((anchors.shape[0],), -1, dtype=torch.long)
        best = torch.full((anchors.shape[0],), -1.0)
        ious = box_iou(anchors, boxes)  # [A, G]
        for g, box in enumerate(boxes):
            dist = (centers - (box[:2] + box[2:]) / 2).norm(dim=1)
            cands = torch.cat([dist[s : s + n].topk(min(topk, n), largest=False).indices + s
                               for s, n in zip(starts, priors.num_per_level, strict=True)])
            cand_iou = ious[cands, g]
            margin = torch.minimum(centers[cands] - box[:2], box[2:] - centers[cands])
            inside = margin.amin(dim=1) > 0.01
            # Strictly greater: on equal IoU the lower box index keeps the prior, like argmax.
            wins = ((cand_iou >= cand_iou.mean() + cand_iou.std()) & inside
                    & (cand_iou > best[cands]))
            best[cands[wins]] = cand_iou[wins]
            assigned[cands[wins]] = g
        out.append(assigned)
    return torch.stack(out)


def make_inputs(batch: int, boxes: int) -> tuple[Priors, Tensor, Tensor, Tensor]:
    priors = make_priors(LEVEL_SIZES, STRIDES, OCTAVE_BASE_SCALE)
    gen = torch.Generator().manual_seed(boxes)
    gt = torch.stack([random_boxes(boxes, HEIGHT, WIDTH, gen) for _ in range(batch)])  # [B, G, 4]
    image_sizes = torch.tensor([[HEIGHT, WIDTH]] * batch)
    valid = valid_prior_mask(priors, image_sizes, SIZE_DIVISOR)  # all True here
    return priors, gt, torch.ones(batch, boxes, dtype=torch.bool), valid


def entrant(name: str, priors: Priors, gt: Tensor, mask: Tensor,
            valid: Tensor) -> Callable[[], Tensor]:
    if name == "batched":
        return lambda: atss_assign(priors.boxes, priors.num_per_level, gt, mask, 9, valid)
    return lambda: loop_assign(priors, gt)


def one_block_assign(priors: Priors, gt: Tensor, mask: Tensor, valid: Tensor) -> Tensor:
    """`atss_assign` with each level's distances in one block, as on a GPU."""
    saved, assigner.CPU_BLOCK_ELEMENTS = assigner.CPU_BLOCK_ELEMENTS, assigner.GPU_BLOCK_ELEMENTS
    try:
        return atss_assign(priors.boxes, priors.num_per_level, gt, mask, 9, valid)
    finally:
        assigner.CPU_BLOCK_ELEMENTS = saved


def blocks_main(batch: int, box_counts: list[int], repeats: int) -> None:
    rows = []
    for boxes in box_counts:
        inputs = make_inputs(batch, boxes)
        runs = {"blocks": entrant("batched", *inputs),
                "one block": functools.partial(one_block_assign, *inputs)}
        same = torch.equal(runs["blocks"](), runs["one block"]())
        t = time_alternating(runs, repeats=repeats, warmup=1)
        rows.append([boxes, f"{t['blocks'] * 1e3:.1f}", f"{t['one block'] * 1e3:.1f}",
                     f"{t['one block'] / t['blocks']:.2f}", "yes" if same else "NO"])
    print(markdown_table(["boxes/img", "blocks ms", "one block ms", "one block/blocks",
                          "same assignment"], rows))


def child(name: str, batch: int, boxes: int) -> None:
    """Runs in a fresh process: prints the call's peak extra memory above its inputs, in MiB."""
    entrant(name, *make_inputs(batch, 1))()  # warm-up: kernels, thread pool, allocator
    print(extra_peak_mib(entrant(name, *make_inputs(batch, boxes))))


def peak_memory(name: str, batch: int, boxes: int, threads: int | None) -> dict[str, float]:
    args = ["--child", name, "--batch", str(batch), "--boxes", str(boxes)]
    return {"peak": peak_in_fresh_process(__file__, args, threads)}


def exponents(xs: list[int], ys: list[float]) -> list[float]:
    """log-log slope of each point against the previous one (nan for the first)."""
    pairs = zip(xs[:-1], xs[1:], ys[:-1], ys[1:], strict=True)
    return [math.nan] + [math.log(y / y0) / math.log(x / x0) for x0, x, y0, y in pairs]


def mib(m: dict[str, float]) -> str:
    return "-" if math.isnan(m["peak"]) else f"{m['peak']:.0f}"


def main() -> None:
    use_retaining_malloc()
    parser = argparse.ArgumentParser()
    parser.add_argument("--boxes", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-memory", action="store_true",
                        help="time only (each memory run is a fresh process)")
    parser.add_argument("--blocks", action="store_true",
                        help="time the CPU blocks of boxes against one block per level")
    parser.add_argument("--child", choices=["batched", "loop"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads)
    if args.child:
        child(args.child, args.batch, args.boxes[0])
        return
    num_priors = make_priors(LEVEL_SIZES, STRIDES, OCTAVE_BASE_SCALE).boxes.shape[0]
    print(f"machine: {machine()}; {allocator_line()}; batch {args.batch}, {HEIGHT}x{WIDTH}, "
          f"{num_priors} priors per image")
    if args.blocks:
        blocks_main(args.batch, args.boxes, args.repeats)
        return

    times, mems, mismatches = [], [], []
    for boxes in args.boxes:
        inputs = make_inputs(args.batch, boxes)
        batched, loop = entrant("batched", *inputs), entrant("loop", *inputs)
        # The loop is the yardstick only if it computes the same assignment (float round-off in
        # the IoUs may flip a prior sitting exactly at a threshold, hence a count, not an assert).
        mismatches.append(int((batched() != loop()).sum()))
        times.append(time_alternating({"batched": batched, "loop": loop}, repeats=args.repeats,
                                      warmup=1))
        skipped = {"peak": math.nan}
        mems.append({name: skipped if args.skip_memory
                     else peak_memory(name, args.batch, boxes, args.threads)
                     for name in ("batched", "loop")})
    time_exp = exponents(args.boxes, [t["batched"] for t in times])
    # Below 1 MiB is noise: clamp so that the slope stays finite.
    mem_exp = exponents(args.boxes, [max(m["batched"]["peak"], 1.0) for m in mems])
    rows = [
        [boxes, f"{t['batched'] * 1e3:.1f}", f"{t['loop'] * 1e3:.1f}",
         f"{t['loop'] / t['batched']:.1f}", mib(m["batched"]), mib(m["loop"]),
         "" if math.isnan(te) else f"{te:.2f}", "" if math.isnan(me) else f"{me:.2f}"]
        for boxes, t, m, te, me in zip(args.boxes, times, mems, time_exp, mem_exp, strict=True)
    ]
    print(markdown_table(["boxes/img", "batched ms", "loop ms", "loop/batched", "batched peak MiB",
                          "loop peak MiB", "batched time exp.", "batched mem exp."], rows))
    print(f"priors assigned differently by the loop: {mismatches} "
          f"(of {args.batch * num_priors} per row)")
    slopes = {name: max((e for e in col if not math.isnan(e)), default=math.nan)
              for name, col in (("time", time_exp), ("memory", mem_exp))}
    print(f"atss_assign, largest exponent: time {slopes['time']:.2f}, "
          f"memory {slopes['memory']:.2f} (<= 1: at most linear in the boxes)")


if __name__ == "__main__":
    main()
