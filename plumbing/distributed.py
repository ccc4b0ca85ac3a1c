"""Several processes for one run (trainer=ddp / fsdp / ddp_cpu / fsdp_cpu, devices x num_nodes > 1).

Every process runs the whole pipeline of run.py on the same config. Training is split by
Lightning (DDP, or FSDP2 through ModelParallelStrategy); generation and judging are split here,
each prompt handled by exactly one process (`map_shards`, no padded duplicates as a distributed
sampler would add); only rank 0 writes files (`is_main`).

Where the processes come from:
- SLURM (srun, e.g. `hydra/launcher=slurm` with tasks_per_node = trainer.devices) or torchrun
  start them: detected from the environment, nothing is launched (multi-node works this way);
- a plain single-node `python run.py trainer=ddp_cpu ...`: `start` launches devices − 1 copies
  of the command with Lightning's own launcher (LOCAL_RANK set) at the start of the run, before
  any work, so that every process does the same work from the beginning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import (
    ClusterEnvironment,
    LightningEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)

from plumbing.errors import InputError

log = logging.getLogger("run")
T = TypeVar("T")

# How long a process waits in a collective for the others: ranks > 0 wait there while rank 0
# holds a cache entry's lock, e.g. while another grid point trains the alignment they share.
COLLECTIVE_TIMEOUT = timedelta(hours=6)


def requested(trainer_cfg) -> tuple[int, int]:
    """(processes per node, nodes) that the trainer config asks for."""
    devices, nodes = trainer_cfg.get("devices", 1), int(trainer_cfg.get("num_nodes", 1))
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if devices in ("auto", -1):
        devices = (
            torch.cuda.device_count() if trainer_cfg.get("accelerator") in ("gpu", "cuda") else 1
        )
    elif not isinstance(devices, int):  # a list of device ids
        devices = len(devices)
    return max(int(devices), 1), nodes


def lightning_strategy(trainer_cfg):
    """The Trainer's `strategy` argument: `fsdp2` becomes Lightning's ModelParallelStrategy over all
    processes, data-parallel only (the defenses' modules apply fully_shard in configure_model)."""
    strategy = trainer_cfg.get("strategy", "auto")
    if strategy != "fsdp2":
        return strategy
    from lightning.pytorch.strategies import ModelParallelStrategy

    per_node, nodes = requested(trainer_cfg)
    return ModelParallelStrategy(data_parallel_size=per_node * nodes, tensor_parallel_size=1)


def cluster_environment() -> ClusterEnvironment:
    for environment in (SLURMEnvironment, TorchElasticEnvironment):
        if environment.detect():
            return environment()
    return LightningEnvironment()


def start(trainer_cfg, multirun: bool) -> None:
    """Join the processes of this run (launching them on a single node when nothing else did) and
    open the process group that every collective here and in Lightning uses. No-op for one process."""
    per_node, nodes = requested(trainer_cfg)
    world = per_node * nodes
    if world == 1 or dist.is_initialized():
        return
    name = str(trainer_cfg.get("strategy", "auto"))
    if name.endswith("_spawn"):
        raise InputError(
            f"trainer.strategy={name} re-spawns processes that the pipeline already started: use "
            f"trainer=ddp_cpu / ddp (strategy ddp) or trainer=fsdp_cpu / fsdp"
        )
    env = cluster_environment()
    if not env.creates_processes_externally:
        if multirun:
            raise InputError(
                "a local multirun cannot start several processes per grid point (each process "
                "would re-run the sweep): use hydra/launcher=slurm with tasks_per_node = "
                "trainer.devices, or run single points"
            )
        if nodes > 1:
            raise InputError(
                f"trainer.num_nodes={nodes}: start the processes with SLURM (hydra/launcher=slurm, "
                f"nodes = trainer.num_nodes) or torchrun on every node"
            )
        # Lightning's own launcher (private API): copies of this command with LOCAL_RANK set, the
        # Hydra run dir pinned, and a watcher that stops all of them if one fails
        from lightning.fabric.strategies.launchers.subprocess_script import (
            _SubprocessScriptLauncher,
        )

        _SubprocessScriptLauncher(env, num_processes=per_node, num_nodes=1).launch(lambda: None)
        log.info("started %d processes on this node", per_node)
    if isinstance(
        env, LightningEnvironment
    ):  # it learns its rank from the Trainer; here, from the env
        env.set_world_size(world)
        env.set_global_rank(env.node_rank() * per_node + env.local_rank())
    if env.world_size() != world:
        raise InputError(
            f"the environment started {env.world_size()} processes but trainer.devices x "
            f"trainer.num_nodes = {per_node} x {nodes}: make them agree (SLURM: tasks_per_node "
            f"= trainer.devices, nodes = trainer.num_nodes)"
        )
    gpu = trainer_cfg.get("accelerator") in ("gpu", "cuda")
    if gpu:
        if not torch.cuda.is_available():
            raise InputError(
                "the trainer asks for GPUs but none is visible: use trainer=cpu, ddp_cpu or fsdp_cpu"
            )
        torch.cuda.set_device(env.local_rank())
    else:  # the node's cores shared among its processes, not each process using all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    dist.init_process_group(
        "nccl" if gpu else "gloo",
        init_method=f"tcp://{env.main_address}:{env.main_port}",
        rank=env.global_rank(),
        world_size=world,
        timeout=COLLECTIVE_TIMEOUT,
    )
    log.info("process %d of %d (%s)", env.global_rank(), world, type(env).__name__)


def finish() -> None:
    """Close this process's process group, if one is open. Without it, gloo's worker threads can
    outlive the interpreter and abort the process (SIGABRT) after a run that succeeded."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast(value: T) -> T:
    """Rank 0's `value` on every process."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def map_shards(items: list, fn: Callable[[list], list]) -> list:
    """`fn` applied to this process's share of `items` (every world_size-th item), the results of
    all processes returned on every process, in the order of `items`: each item is processed by
    exactly one process. `fn` must return one result per item it gets."""
    world = world_size()
    mine = items[rank() :: world]
    results = fn(mine)
    if len(results) != len(mine):
        raise ValueError(f"map_shards: {len(results)} results for {len(mine)} items")
    if world == 1:
        return list(results)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, list(results))
    merged: list = [None] * len(items)
    for r, part in enumerate(gathered):
        merged[r::world] = part
    return merged
