"""Where the compressor computes: `--device auto|cpu|cuda[:N]`.

The built decoder layer, the hidden states of the calibration windows, the statistics and the fits live on
this device; tensors read from the checkpoint are moved there layer by layer, and every written tensor goes
back to the host through the format writer. `auto` takes CUDA when torch sees a GPU, else the CPU; under
torchrun `cuda` (without an index) means this process's GPU, `cuda:LOCAL_RANK`.
"""

from __future__ import annotations

import os

import torch

from moesvd_vllm.errors import MoESVDError

DEVICE_CHOICES_HELP = "auto (CUDA when present, else CPU), cpu, cuda or cuda:N"


class DeviceError(MoESVDError):
    """The requested compute device does not exist on this machine."""


def _cuda_unavailable_reason() -> str:
    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch "
                "(https://pytorch.org/get-started/locally/) or run with --device cpu")
    return ("torch is built with CUDA but sees no GPU (check nvidia-smi, the driver and "
            "CUDA_VISIBLE_DEVICES), or run with --device cpu")


def check_device_spec(spec: str) -> None:
    """Refuse a malformed `--device` value (syntax only; whether it exists is `resolve_device`'s job)."""
    kind, _, index = spec.partition(":")
    if spec in ("auto", "cpu", "cuda") or (kind == "cuda" and index.isdigit()):
        return
    raise DeviceError(f"--device {spec!r} is not one of {DEVICE_CHOICES_HELP}")


def resolve_device(spec: str, local_rank: int | None = None) -> torch.device:
    """The torch device for `spec` (see the module docstring); a CUDA device that does not exist is a clear
    error naming the fix."""
    check_device_spec(spec)
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {spec} asks for a CUDA GPU, but {_cuda_unavailable_reason()}")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    index = int(spec.partition(":")[2]) if ":" in spec else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"--device cuda:{index} does not exist: torch sees {count} GPU(s) (cuda:0 .. "
                          f"cuda:{count - 1}); under torchrun give --device cuda (each process takes its "
                          "LOCAL_RANK's GPU) and at most that many processes per node")
    return torch.device("cuda", index)
