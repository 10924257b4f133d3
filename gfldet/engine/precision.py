"""Which floating-point precision a run computes in: `train.amp` resolved for the device at hand.

`auto` picks the fastest precision that is also safe on the hardware:
- CPU with native bf16 (AVX512-BF16 or AMX, as torch reports them): bf16 autocast;
- any other CPU: fp32, because there bf16 is emulated and several times slower than fp32;
- CUDA: bf16 where the GPU supports it, else fp16 (with the gradient scaler).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from gfldet.config_io import ConfigError

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still include native bf16 instructions.
_ONEDNN_ISAS_WITH_BF16 = ("BF16", "AMX", "FP16", "AVX10", "ALL")


@dataclass(frozen=True)
class Precision:
    """The resolved `train.amp`: the autocast dtype (None = plain fp32) and why it was chosen."""

    dtype: torch.dtype | None
    reason: str
    warning: str | None = None  # set when the choice will run far slower than it could

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX) for oneDNN, and what was found.
    The convolutions, most of a step's time, run in oneDNN: its cap (ONEDNN_MAX_CPU_ISA, or the
    older DNNL_MAX_CPU_ISA) decides. ATEN_CPU_CAPABILITY caps only torch's own kernels: with it
    alone, bf16 still runs on AMX and trains faster than fp32 (benchmarks/README.md)."""
    capability = torch.backends.cpu.get_cpu_capability()
    avx512_bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    found = [name for name, present in (("AVX512-BF16", avx512_bf16), ("AMX", amx)) if present]
    if not found:
        return False, (f"no native bf16 on this CPU (torch's CPU capability: {capability}; "
                       "no AVX512-BF16 or AMX)")
    # oneDNN reads ONEDNN_* first, then DNNL_*: name the variable that set the cap.
    variable = next((v for v in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA") if os.environ.get(v)),
                    None)
    if variable and not any(tag in os.environ[variable].upper() for tag in _ONEDNN_ISAS_WITH_BF16):
        return False, (f"the CPU has {'/'.join(found)}, but oneDNN is capped at "
                       f"{os.environ[variable]} ({variable})")
    aten = "" if capability.upper().startswith(("AVX512", "AMX")) else (
        f"; ATEN_CPU_CAPABILITY caps torch's other kernels at {capability}, not the convolutions")
    return True, f"native bf16 on this CPU ({'/'.join(found)}){aten}"


def resolve_precision(amp: str, device: torch.device) -> Precision:
    """`train.amp` ("auto", "none", "bf16" or "fp16") for `device`; fp16 off CUDA: ConfigError."""
    if amp == "none":
        return Precision(None, "train.amp is none")
    if device.type == "cuda":
        if amp == "auto":
            if torch.cuda.is_bf16_supported():
                return Precision(torch.bfloat16, "train.amp is auto and this GPU supports bf16")
            return Precision(torch.float16, "train.amp is auto and this GPU has no bf16: fp16 "
                             "with the gradient scaler")
        return Precision(torch.float16 if amp == "fp16" else torch.bfloat16, f"train.amp is {amp}")
    if amp == "fp16":
        raise ConfigError(f"train.amp: fp16 needs a CUDA device, and this run is on {device.type}; "
                         "use auto, bf16 or none")
    native, found = cpu_bf16_support()
    if amp == "auto":
        return Precision(torch.bfloat16 if native else None, f"train.amp is auto and {found}")
    return Precision(torch.bfloat16, f"train.amp is bf16; {found}", warning=None if native else (
        "bf16 is emulated on this CPU: expect it to run several times slower than fp32 "
        "(benchmarks/bf16_conv.py measures it). Set train.amp: auto (or none) to train in fp32 "
        "here."))
