"""Launching under torchrun and SLURM: which process writes the run, a recipe that disagrees
with the launcher is refused at start, and a real two-node run (two torchrun launches on this
machine, gloo) trains with one writer."""

import json
import os
import socket
import subprocess

import pytest

from tests.conftest import smoke_train_cmd
from train.cli import main
from train.launch import global_rank, launch_problems, launcher
from train.recipe import RecipeError, load_recipe

LAUNCH_VARIABLES = (
    "TORCHELASTIC_RUN_ID",
    "RANK",
    "GROUP_RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "WORLD_SIZE",
)


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SLURM_") or name in LAUNCH_VARIABLES or name == "NODE_RANK":
            monkeypatch.delenv(name)
    return monkeypatch


def torchrun_env(env, rank, local_rank, local_world, world):
    env.setenv("TORCHELASTIC_RUN_ID", "test")
    for name, value in (
        ("RANK", rank),
        ("GROUP_RANK", rank // local_world),
        ("LOCAL_RANK", local_rank),
        ("LOCAL_WORLD_SIZE", local_world),
        ("WORLD_SIZE", world),
    ):
        env.setenv(name, str(value))


def slurm_env(env, procid, tasks_per_node, nodes):
    for name, value in (
        ("SLURM_NTASKS", tasks_per_node * nodes),
        ("SLURM_NTASKS_PER_NODE", tasks_per_node),
        ("SLURM_NNODES", nodes),
        ("SLURM_PROCID", procid),
        ("SLURM_LOCALID", procid % tasks_per_node),
        ("SLURM_NODEID", procid // tasks_per_node),
        ("SLURM_JOB_NAME", "vtc"),
    ):
        env.setenv(name, str(value))


def test_global_rank_under_each_launcher(clean_env):
    assert launcher() == "vtc" and global_rank(8) == 0
    clean_env.setenv("NODE_RANK", "1")
    clean_env.setenv("LOCAL_RANK", "3")  # Lightning's own launcher, second node
    assert global_rank(8) == 11
    clean_env.delenv("NODE_RANK")
    torchrun_env(clean_env, rank=9, local_rank=1, local_world=8, world=16)
    assert launcher() == "torchrun" and global_rank(8) == 9
    for name in LAUNCH_VARIABLES:
        clean_env.delenv(name)
    slurm_env(clean_env, procid=8, tasks_per_node=8, nodes=2)
    assert launcher() == "slurm" and global_rank(8) == 8  # local rank 0 of node 2: not the writer


def test_recipe_must_match_the_launcher(clean_env):
    torchrun_env(clean_env, rank=0, local_rank=0, local_world=2, world=4)
    assert launch_problems(2, 2) == []
    (key, message), *_ = launch_problems(2, 1)
    assert key == "trainer.num_nodes" and "4 processes" in message
    overrides = ["trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu"]
    with pytest.raises(RecipeError, match=r"trainer\.num_nodes"):
        load_recipe("tiny/smoke", overrides)
    assert launch_problems(4, 1)[0][0] == "trainer.devices"
    for name in LAUNCH_VARIABLES:
        clean_env.delenv(name)
    slurm_env(clean_env, procid=0, tasks_per_node=8, nodes=2)
    assert launch_problems(8, 2) == []
    assert {key for key, _ in launch_problems(4, 1)} == {"trainer.devices", "trainer.num_nodes"}
    clean_env.setenv("SLURM_NTASKS_PER_NODE", "8(x2)")
    assert launch_problems(8, 2) == []


def test_under_slurm_lightning_neither_requeues_nor_restores_its_own_checkpoints(clean_env, tmp_path):
    """Under srun every stage's Trainer gets SLURMEnvironment(auto_requeue=False): Lightning
    registers no handler for the requeue signal (so it never writes an hpc_ckpt), and vtc's
    checkpoints stay the only resume path. Elsewhere no cluster environment is forced."""
    import signal

    import lightning as L

    from train.checkpoint import TrainablesCheckpointIO
    from train.launch import cluster_plugins

    assert cluster_plugins() == []
    slurm_env(clean_env, procid=0, tasks_per_node=1, nodes=1)
    (environment,) = cluster_plugins()
    assert environment.auto_requeue is False
    before = signal.getsignal(signal.SIGUSR1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy="ddp",
        plugins=[TrainablesCheckpointIO(), *cluster_plugins()],
        default_root_dir=tmp_path,
        logger=False,
    )
    assert trainer.strategy.cluster_environment.auto_requeue is False
    trainer._signal_connector.register_signal_handlers()  # what fit does first
    try:
        assert signal.getsignal(signal.SIGUSR1) is before  # no requeue handler
    finally:
        trainer._signal_connector.teardown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_under_torchrun(tmp_path):
    """Two torchrun launches (node ranks 0 and 1, one process each) train one run over gloo:
    each rank sees its own samples, both end with the same weights, one writes the run."""
    run_dir, port = tmp_path / "run", free_port()
    train = smoke_train_cmd(
        run_dir,
        tmp_path / "data",
        "trainer.strategy=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.num_nodes=2",
        "trainer.record_samples=true",
        "trainer.threads=1",
        "stages.0.steps=2",
        "stages.1.steps=3",
    )[1:]  # `-m train.cli train ...`
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    for name in LAUNCH_VARIABLES:
        env.pop(name, None)
    # make the data first (in this process), so that the two nodes do not race to write it
    prepare = smoke_train_cmd(tmp_path / "prep", tmp_path / "data", "stages.0.steps=1", "stages.1.steps=1")
    assert main(prepare[3:]) == 0
    nodes = [
        subprocess.Popen(
            [
                "torchrun",
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={rank}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                *train,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    records = [json.loads((run_dir / f"record-instruct-rank{r}.json").read_text()) for r in (0, 1)]
    assert not set(records[0]["seen_ids"]) & set(records[1]["seen_ids"])
    assert records[0]["weights_sha256"] == records[1]["weights_sha256"]
    assert (run_dir / "meta.json").is_file()
    assert "[vtc] recipe" in outputs[0] or "stage" in outputs[0]
    assert "parameters" not in outputs[1]  # node 1 prints no stage table: only rank 0 reports
