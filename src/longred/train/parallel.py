"""Process group, device, and the parallel wrapping of the student: one code path for 1 or W processes.

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in the environment) the process group is
initialised here (NCCL on CUDA, gloo on CPU); a plain `python` run is world size 1 and wraps nothing.
`parallelize` applies, in this order: activation checkpointing (already on the model: transformers'
`activation_checkpointing_enable`, before any wrapping) -> torch.compile per block -> DDP or FSDP2
(`fully_shard` on every block, then on the root, which holds embeddings, final norm and lm_head).

Every rank loads the full student on its host before sharding (simple, and the weights come from a
Hugging Face folder); the alternative, a meta-device model materialised from rank 0's weights, saves
host memory at 8B scale (32 GB of fp32 per rank) but must re-initialise RoPE's non-persistent buffers.
On CUDA, FSDP2 gathers parameters in bf16 and reduces gradients in fp32 (MixedPrecisionPolicy); on CPU
everything stays fp32, which is what makes the CPU equivalence tests exact.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.nn.parallel import DistributedDataParallel

__all__ = ["Distributed", "parallelize", "gradient_sync", "unwrap"]


@dataclass
class Distributed:
    """This process's place in the run: rank, world size and device."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool
    """Whether `setup` initialised the process group (and `close` must destroy it)."""

    @classmethod
    def setup(cls, device: str | None = None, *, single_group: bool = False) -> Distributed:
        """Join torchrun's process group when WORLD_SIZE > 1; pick cuda:LOCAL_RANK or the given device.

        `single_group`: a plain one-process run still gets a (one-rank) process group, which FSDP2 needs
        (cpu_offload on one GPU)."""
        world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", 0))
        chosen = (
            torch.device(device)
            if device
            else torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        )
        if chosen.type == "cuda" and chosen.index is None:
            chosen = torch.device(f"cuda:{local}")
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        owns = world > 1 and not dist.is_initialized()
        if owns:  # a long timeout: rank 0 tokenizes the long corpus once while the others wait
            dist.init_process_group(
                "nccl" if chosen.type == "cuda" else "gloo",
                device_id=chosen if chosen.type == "cuda" else None,
                timeout=datetime.timedelta(hours=1),
            )
        if single_group and world == 1 and not dist.is_initialized():
            backend = "nccl" if chosen.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            owns = True
        rank = dist.get_rank() if dist.is_initialized() else 0
        return cls(
            rank=rank,
            world_size=dist.get_world_size() if dist.is_initialized() else 1,
            device=chosen,
            owns_group=owns,
        )

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def mean(self, values: list[float]) -> list[float]:
        """The element-wise mean of a list of floats over ranks."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return (tensor / self.world_size).tolist()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def parallelize(
    model: nn.Module,
    *,
    blocks: nn.ModuleList,
    mode: str,
    world_size: int,
    device: torch.device,
    compile: bool,
    cpu_offload: bool = False,
) -> nn.Module:
    """Compile the blocks, then wrap for DDP / FSDP2 (world size > 1).

    Args:
        model: the root module (the student's objectives), already on `device`.
        blocks: the student's transformer blocks (compile and FSDP2 units).
        mode: "ddp" or "fsdp".
        cpu_offload: FSDP2's CPUOffloadPolicy: sharded parameters, gradients and so the optimizer state
            live in host memory, each block's parameters are copied to the device for its forward and
            backward (also at world size 1, in the one-rank group `Distributed.setup` made).

    Returns:
        The module to call and to build the optimizer from: `model` itself (1 process or FSDP2, which
        shards in place) or its DDP wrapper.
    """
    if compile:
        for block in blocks:
            block.compile()
    if world_size == 1 and not cpu_offload:
        return model
    if cpu_offload and mode != "fsdp":
        raise ValueError(f"cpu_offload is FSDP2's CPUOffloadPolicy: it needs parallel fsdp, got {mode}")
    if mode == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    for block in blocks:
        fully_shard(block, mp_policy=policy, offload_policy=offload)
    fully_shard(model, mp_policy=policy, offload_policy=offload)
    return model


def gradient_sync(model: nn.Module, *, sync: bool) -> contextlib.AbstractContextManager:
    """Context for one micro-step's backward: reduce gradients across ranks only when `sync` (the last)."""
    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards in place: nothing to unwrap)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
