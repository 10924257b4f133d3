"""bf16 autocast against fp32 on this CPU: one 3x3 convolution, forward + backward.

    python benchmarks/bf16_conv.py [--repeats 6] [--threads N]
    # imitate an AVX2-only CPU:
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bf16_conv.py

The case of issue 14: Conv2d(128 -> 128, 3x3), input [8, 128, 40, 40], as the demo's FPN and
head run it. On a CPU without native bf16 (no AVX512-BF16 / AMX) oneDNN emulates bf16 and the
conv is several times slower than in fp32; `train.amp: auto` trains in fp32 there. Prints what
`gfldet.engine.precision` decides for this CPU, and the medians of alternating runs.
"""

from __future__ import annotations

import argparse

import torch
from common import machine, set_threads, time_alternating
from torch import nn

from gfldet.engine.precision import cpu_bf16_support, resolve_precision


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    conv = nn.Conv2d(128, 128, 3, padding=1)
    x = torch.randn(8, 128, 40, 40, requires_grad=True)

    def step(dtype: torch.dtype | None):
        def run() -> None:
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                out = conv(x)
            out.float().sum().backward()
        return run

    medians = time_alternating({"fp32": step(None), "bf16": step(torch.bfloat16)},
                               repeats=args.repeats, warmup=1)
    native, found = cpu_bf16_support()
    auto = resolve_precision("auto", torch.device("cpu")).name
    print(f"machine: {machine()}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"native bf16: {native} ({found}); train.amp auto -> {auto}")
    print(f"conv 128->128 3x3, [8, 128, 40, 40], forward + backward, median of {args.repeats}:")
    print(f"  fp32 {medians['fp32']:.3f} s   bf16 {medians['bf16']:.3f} s   "
          f"bf16 / fp32 = {medians['bf16'] / medians['fp32']:.1f}x")


if __name__ == "__main__":
    main()
