"""Devices, mixed precision and processes: what training and evaluation share.

* :func:`resolve_device`: "auto" is the GPU when there is one, else the CPU.
* :func:`inference_batch_size`: images per feature-extraction batch.
* :func:`autocast`: bf16 autocast on CUDA when asked for; nothing elsewhere
  (CPU autocast gave no speed here and costs accuracy).
* :class:`Runtime`: rank, world size and device of this process under
  ``torchrun`` (one process group: NCCL on GPU, gloo on CPU), used by
  distributed training and by evaluation's sharding over categories.
* :class:`GlobalBatchNorm2d` / :func:`sync_batchnorm`: batch norm over the
  global batch, so N processes train the same model as one.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from escape_fast.errors import UsageError


def resolve_device(arg: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None): "cuda" when a GPU is visible, else "cpu"; anything else as torch reads it."""
    if arg is None or arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(arg)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"--device {arg!r} is not a device (auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {arg!r}: no CUDA GPU is visible here; use auto or cpu")
    return device


# On the CPU, feature extraction slowed down when a batch held more than about 2^18 input pixels
# (2 cores: an earlier built-in evaluation, 128 px, took 12 s in batches of 16 and 17 s in 32; the
# predictor, 256 px, 1.6 s for 62 photos in batches of 4 and 3.0 s in 16), so the batch shrinks
# as the input grows. A GPU wants large batches.
CPU_BATCH_PIXELS = 1 << 18
GPU_BATCH = 32


def inference_batch_size(device: torch.device, input_size: int) -> int:
    """Images per feature-extraction batch at ``input_size`` px on ``device`` (when the user gives none)."""
    if torch.device(device).type == "cpu":
        return max(1, CPU_BATCH_PIXELS // (input_size * input_size))
    return GPU_BATCH


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA when ``enabled``; a no-op context elsewhere."""
    if enabled and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _restart_store(rank: int, world: int):
    """Under torchrun, the process group's key-value store with its keys under
    the restart count: after torchrun restarts the processes of a job (one was
    lost), the new ones must not read the addresses the old ones published in
    the same store (seen: the new processes connected to a dead peer's port
    and the restart failed). None outside torchrun (plain env://)."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or "MASTER_ADDR" not in os.environ:
        return None
    from datetime import timedelta

    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"  # the launcher hosts it
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent and rank == 0, timeout=timedelta(minutes=30))
    return dist.PrefixStore(f"escape_fast/restart{restart}", store)


class Runtime:
    """Rank, world size and device of this process (torchrun sets the environment).

    Several processes share one process group, created here once (NCCL for
    CUDA devices, gloo for the CPU) and ended by :meth:`close`.
    """

    def __init__(self, device_arg: str = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device_arg)
        if device.type == "cuda" and device.index is None:
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        self.device = device
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            store = _restart_store(self.rank, self.world)
            if store is None:
                dist.init_process_group(backend)
            else:
                dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """Batch norm over the global batch on CPU (gloo), where torch's
    SyncBatchNorm is CUDA-only: the sums, then the centred squared sums, are
    all-reduced. (One pass with E[x^2] - E[x]^2 loses float32 digits when
    the mean is large against the spread, and Adam turns that into visibly
    different weights after an epoch.)"""

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        count = torch.tensor([x.numel() // c], dtype=x.dtype, device=x.device)
        sums = all_reduce(torch.cat((x.sum((0, 2, 3)), count)))
        n = sums[-1]
        mean = sums[:c] / n
        centred = x - mean[None, :, None, None]
        var = all_reduce(centred.square().sum((0, 2, 3))) / n
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * var * n / (n - 1))
            self.num_batches_tracked.add_(1)
        y = centred * torch.rsqrt(var[None, :, None, None] + self.eps)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of ``module`` computed over the global batch."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GlobalBatchNorm2d):
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats).to(device)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            sync_batchnorm(child, device)
    return module
