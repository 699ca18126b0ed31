"""How this process was launched — by `vtc train` itself (Lightning starts the other local
ranks), by `torchrun`, or by SLURM's `srun` — read before Lightning sets anything up, through
Lightning's own cluster environments so that vtc and the Trainer agree.

Two things depend on it: which process writes the run directory (global rank 0 only: on a shared
filesystem every node sees the same folder), and whether the recipe's `trainer.devices` and
`trainer.num_nodes` match what the launcher started (a mismatch otherwise surfaces as a hang or
an error deep inside the process-group setup).
"""

from __future__ import annotations

import os
import re

from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment


def launcher() -> str:
    """'torchrun', 'slurm' (srun, as Lightning detects it) or 'vtc' (a single process, or
    Lightning's own launcher starting the other local ranks)."""
    if TorchElasticEnvironment.detect():
        return "torchrun"
    if SLURMEnvironment.detect():
        return "slurm"
    return "vtc"


def cluster_plugins() -> list:
    """The cluster environment every stage's Trainer is given. Under SLURM, Lightning's own
    auto-requeue is turned off: on the requeue signal (`sbatch --signal=USR1@90`) it would save an
    `hpc_ckpt_N.ckpt` into the run and requeue the job, and each later stage, which starts with
    no checkpoint, would then be restored from that one (another stage's state). vtc's own
    checkpoints and `vtc train ... --resume auto` are the requeue path (README)."""
    return [SLURMEnvironment(auto_requeue=False)] if launcher() == "slurm" else []


def global_rank(devices: int) -> int:
    """This process's global rank: torchrun's RANK, SLURM's SLURM_PROCID, or under Lightning's
    own launcher NODE_RANK × devices + LOCAL_RANK (both unset in the process the user started)."""
    kind, env = launcher(), os.environ
    if kind == "torchrun":
        return int(env["RANK"])
    if kind == "slurm":
        return int(env["SLURM_PROCID"])
    return int(env.get("NODE_RANK", 0)) * devices + int(env.get("LOCAL_RANK", 0))


def _per_node(value: str) -> int:
    """SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE: '8', or '8(x2)' for 8 on each of 2 nodes."""
    match = re.match(r"(\d+)", value)
    return int(match.group(1)) if match else 0


def launch_problems(devices: int, num_nodes: int) -> list[tuple[str, str]]:
    """(recipe key, message) for each way `devices` per node × `num_nodes` disagrees with what
    the launcher started."""
    kind, environ = launcher(), os.environ
    problems = []
    if kind == "torchrun":
        world, local = int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_WORLD_SIZE", devices))
        if local != devices:
            problems.append(
                (
                    "trainer.devices",
                    f"torchrun started {local} processes per node (--nproc-per-node), the recipe has {devices}",
                )
            )
        if world != devices * num_nodes and local == devices:
            problems.append(
                (
                    "trainer.num_nodes",
                    f"torchrun started {world} processes in all ({world // max(local, 1)} node(s) × {local}), "
                    f"the recipe has {num_nodes} node(s) × {devices}",
                )
            )
    elif kind == "slurm":
        nodes = int(environ.get("SLURM_NNODES", environ.get("SLURM_JOB_NUM_NODES", num_nodes)))
        per_node = environ.get("SLURM_NTASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
        if nodes != num_nodes:
            problems.append(
                (
                    "trainer.num_nodes",
                    f"the SLURM job has {nodes} node(s) (SLURM_NNODES), the recipe {num_nodes}",
                )
            )
        if per_node is not None and _per_node(per_node) != devices:
            problems.append(
                (
                    "trainer.devices",
                    f"SLURM runs {_per_node(per_node)} task(s) per node (--ntasks-per-node), the recipe has "
                    f"{devices} device(s) per node: one task per device",
                )
            )
    return problems
