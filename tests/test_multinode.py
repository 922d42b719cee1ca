"""Two nodes on one machine: two ``torchrun`` agents (``--nnodes 2``, each its own
``--node-rank``) rendezvous on 127.0.0.1 and train one run on the CPU with gloo, as two
machines sharing the data and the run folder would; the run then resumes the same way."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from test_train_cli import (
    assert_same_metrics,
    metric_values,
    odd_dataset,  # noqa: F401 - a fixture: 5 validation images, padded to 6 on 2 ranks
    read_csv,
    validate_on_one_process,
    validation_epochs,
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_nodes(data: Path, out: Path, *flags: str) -> list[subprocess.CompletedProcess]:
    """``train.py`` under two torchrun agents, node ranks 0 and 1, one process each."""
    port = str(free_port())
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "GLOO_SOCKET_IFNAME": "lo"}
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
                "train.py",
                "--config",
                "configs/smoke.yaml",
                "--data",
                str(data),
                "--out",
                str(out),
                "--coordconv",
                "--quiet",
                "--threads",
                "1",
                "--accelerator",
                "cpu",
                "--devices",
                "1",
                "--num-nodes",
                "2",
                "--strategy",
                "ddp",
                "--limit-train-batches",
                "2",
                "--limit-val-batches",
                "1.0",
                *flags,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    results = []
    for agent in agents:
        try:
            stdout, stderr = agent.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for other in agents:
                other.kill()
            raise
        results.append(subprocess.CompletedProcess(agent.args, agent.returncode, stdout, stderr))
    return results


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's notes on the bare Trainer
def test_two_nodes_score_every_validation_image_once_and_resume(odd_dataset, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    for flags, epochs in (((), 1), (("--resume", "last", "--max-epochs", "2"), 2)):
        first, second = two_nodes(odd_dataset, out, *flags)
        for result in (first, second):
            assert result.returncode == 0, result.stderr[-3000:]
        # node 0's rank 0 writes the run; node 1 writes nothing
        assert first.stdout.splitlines() == [
            f"run written to {out}/ (checkpoints/best.ckpt, metrics.json, config.yaml)"
        ]
        assert second.stdout == ""
        assert json.loads((out / "metrics.json").read_text())["epochs"] == epochs
        # 5 images on 2 ranks (one padded in): scored once on rank 0, as one process scores
        # the same weights
        assert_same_metrics(validate_on_one_process(out), metric_values(out))
    assert validation_epochs(read_csv(out / "logs" / "metrics.csv")) == [0, 1]
