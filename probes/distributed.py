"""Data-parallel runs on torch.distributed.

Under `torchrun --nproc_per_node N`, every rank loads the model on its own device, takes
the windows `rank, rank + N, rank + 2N, ...` of the corpus, and folds its reducers; rank 0
gathers the folded states, merges them and alone builds the tables and writes the run.
The process group uses gloo on the CPU and nccl on GPUs.  States travel through
`gather_object`, torch's own exchange between the ranks of one job; nothing read from a
file is ever unpickled.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
from typing import TypeVar

import torch

from layerscope.probes.corpus import TokenWindows

Mergeable = TypeVar("Mergeable")


def active() -> bool:
    """Whether this process is one rank of several; joins the group torchrun describes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        # A group still open when the interpreter exits can abort the process as gloo's
        # threads are torn down ("terminate called without an active exception").
        atexit.register(_leave_group)
    return dist.get_world_size() > 1


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_device(device: str) -> str:
    """Under torchrun with GPUs, "auto" and "cuda" mean this rank's own GPU."""
    if active() and torch.cuda.is_available() and device in ("auto", "cuda"):
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def shard(windows: TokenWindows) -> tuple[TokenWindows, torch.Tensor]:
    """This rank's windows, every world_size-th from its rank, with their corpus indices."""
    index = torch.arange(rank(), windows.input_ids.shape[0], world_size())
    if len(index) == 0:
        from layerscope.probes.errors import UserError

        raise UserError(f"{windows.input_ids.shape[0]} window(s) cannot be shared by {world_size()} ranks; "
                        "give more tokens or fewer processes")
    return dataclasses.replace(windows, input_ids=windows.input_ids[index]), index


def describe_shards(n_windows: int) -> dict:
    """What the manifest records: the world size and the windows of each rank."""
    size = world_size()
    return {"world_size": size, "process_group": _backend_name(),
            "shards": {str(r): f"windows {r}, {r + size}, ... of {n_windows} ({len(range(r, n_windows, size))})"
                       for r in range(size)}}


def _backend_name() -> str:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_initialized() else "none"


def merged_on_rank0(part: Mergeable) -> Mergeable | None:
    """Every rank's `part` merged (`a.merge(b)`, in rank order) on rank 0; None elsewhere."""
    import torch.distributed as dist

    gathered = [None] * world_size() if rank() == 0 else None
    dist.gather_object(part, gathered, dst=0)
    if rank() != 0:
        return None
    whole = gathered[0]
    for other in gathered[1:]:
        whole = whole.merge(other) or whole
    return whole
