"""One process per device under torchrun: process-group setup (NCCL on GPUs, gloo on CPUs), DDP / FSDP wrapping,
rank-0 helpers, and starting torchrun for `--devices N` on one node.

`python -m acestep_core.train --devices N` (one node) re-launches itself as
`python -m torch.distributed.run --nproc_per_node N -m acestep_core.train ...`. Several nodes are started with
torchrun on every node (`--nnodes M --node_rank i --master_addr ... --nproc_per_node N`); `--devices` /
`--num_nodes`, when given, must then agree with torchrun's LOCAL_WORLD_SIZE and WORLD_SIZE.
"""
from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    """True when torchrun (or another launcher) set the rank variables."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def check_topology(devices: int | None, num_nodes: int | None) -> None:
    """--devices / --num_nodes must match torchrun's environment (ValueError naming both)."""
    local, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
    if devices is not None and devices != local:
        raise ValueError(f"--devices {devices} but torchrun started {local} process(es) on this node "
                         "(--nproc_per_node); drop --devices or make them equal")
    if num_nodes is not None and num_nodes * local != world:
        raise ValueError(f"--num_nodes {num_nodes} x {local} processes per node != WORLD_SIZE {world}; "
                         "drop --num_nodes or match torchrun --nnodes")


def relaunch_with_torchrun(devices: int, num_nodes: int, argv: Sequence[str]) -> int:
    """Start `devices` local processes of this module with torchrun (single node only); returns its exit code."""
    if num_nodes > 1:
        raise ValueError(
            f"--num_nodes {num_nodes}: start the job with torchrun on every node, e.g. "
            f"torchrun --nnodes {num_nodes} --node_rank <i> --master_addr <host of node 0> --master_port 29500 "
            f"--nproc_per_node {devices} -m acestep_core.train {' '.join(argv)}"
        )
    from torch.distributed.run import main as torchrun

    command = ["--nproc_per_node", str(devices), "--standalone", "-m", "acestep_core.train", *argv]
    try:
        torchrun(command)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except Exception as err:  # torchrun raises ChildFailedError when a worker fails; its report is already printed
        print(f"torchrun failed: {type(err).__name__}", file=sys.stderr)
        return 1
    return 0


def pick_device(accelerator: str, local_rank: int) -> torch.device:
    """cuda:<local_rank> when CUDA is available (or asked for), else cpu."""
    if accelerator not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--accelerator must be auto, cpu or cuda, got {accelerator!r}")
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ValueError("--accelerator cuda but no CUDA device is visible; use --accelerator cpu")
    if accelerator != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(accelerator: str = "auto", timeout_minutes: float = 120.0) -> DistEnv:
    """Join the torchrun process group (NCCL for CUDA, gloo for CPU); a single process when not under torchrun."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistEnv(0, 1, 0, pick_device(accelerator, 0))
    local_rank = int(os.environ["LOCAL_RANK"])
    device = pick_device(accelerator, local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown() -> None:
    """Leave the process group if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op for one process)."""
    if env.distributed:
        dist.barrier()


def broadcast_object(env: DistEnv, value: object) -> object:
    """Rank 0's `value` on every rank."""
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(env: DistEnv, values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of a small float tensor across ranks (for logging)."""
    if not env.distributed:
        return values
    values = values.detach().to(env.device, torch.float64).clone()
    dist.all_reduce(values)
    return (values / env.world_size).cpu()


def wrap_model(module: nn.Module, env: DistEnv, *, fsdp: bool) -> nn.Module:
    """DDP (unused-parameter detection, as the official trainer) or FSDP2 units: each block's cross-attention,
    each block, and the root (embedders, Conformer, final layer)."""
    if not env.distributed:
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        # The outputs it warns about (split-head K/V, the unpatchified velocity) are never modified in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for block in module.transformer.transformer_blocks:
            fully_shard(block.cross_attn)                   # its key_value runs outside the block's forward
            register_fsdp_forward_method(block.cross_attn, "key_value")
            fully_shard(block)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The training module inside a DDP wrapper (FSDP2 modules are their own)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
