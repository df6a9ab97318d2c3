"""Issue 15: the data-parallel sampler contract, the multi-node recipes of docs/distributed.md (parsed and
dry-run), and the one-line refusal of more devices than the machine has. No training here."""

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np

from medlens.cli.main import main
from medlens.engine.sampling import EpochBatchSampler

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "distributed.md"
CFG = ROOT / "configs" / "pneumoniamnist_cnn.yaml"


def test_two_replicas_see_exactly_the_batches_of_one_process_with_the_effective_batch():
    labels = np.arange(103) % 2
    for epoch in (0, 3):
        # the contract, computed here independently: epoch order from (seed, epoch), global batches of 2 x 8
        order = np.random.default_rng([5, epoch]).permutation(103)
        shards = []
        for rank in (0, 1):
            s = EpochBatchSampler(labels, "binary", 8, "shuffle", seed=5, num_replicas=2, rank=rank)
            s.set_epoch(epoch)
            shards.append(list(s))
            assert len(s) == len(shards[-1]) == 7  # ceil(103 / 16): both ranks step together
        for i in range(7):
            together = np.concatenate([shards[0][i], shards[1][i]])
            assert np.array_equal(together, order[16 * i: 16 * (i + 1)])


def test_last_batch_smaller_than_the_processes_is_padded_from_the_epoch_start():
    s = [EpochBatchSampler(np.zeros(17), "binary", 8, "shuffle", seed=0, num_replicas=2, rank=r) for r in (0, 1)]
    order = np.random.default_rng([0, 0]).permutation(17)
    last = [list(x)[-1] for x in s]
    assert [len(b) for b in last] == [1, 1]
    assert last[0][0] == order[16] and last[1][0] == order[0]


def _fenced(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def _dry_run(argv: list[str], env: dict, capsys, monkeypatch) -> dict:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    assert main(argv + ["--dry-run"]) == 0
    return json.loads(capsys.readouterr().out.replace("\n", ""))


def _medlens_args(tokens: list[str]) -> list[str]:
    args = tokens[tokens.index("train"):]
    args[1] = str(ROOT / args[1])
    return args


def _scaled(args: list[str], devices: int) -> list[str]:
    """The recipe on this machine: its processes per node cut to what the machine has."""
    return [str(devices) if i and args[i - 1] == "--devices" else a for i, a in enumerate(args)]


def test_torchrun_recipe_parses_and_dry_runs(capsys, monkeypatch):
    from torch.distributed.run import get_args_parser

    cmd = [b for b in _fenced("bash") if b.startswith("torchrun")][0]
    tokens = shlex.split(cmd)
    ns = get_args_parser().parse_args(tokens[1:])  # torchrun's own parser
    assert ns.nnodes == "2" and ns.nproc_per_node == "4" and ns.module and ns.training_script == "medlens.cli.main"
    args = _medlens_args(tokens)
    assert args[args.index("--devices") + 1] == ns.nproc_per_node
    # rank 3 of 2 nodes x 2 processes, with the variables torchrun sets
    env = {"TORCHELASTIC_RUN_ID": "t", "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "GROUP_RANK": "1",
           "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    out = _dry_run(_scaled(args, 2), env, capsys, monkeypatch)
    assert (out["launcher"], out["world_size"], out["rank"], out["num_nodes"], out["backend"]) == \
        ("torchrun", 4, 3, 2, "gloo")


def test_slurm_recipe_parses_and_dry_runs(capsys, monkeypatch, tmp_path):
    script = [b for b in _fenced("bash") if b.startswith("#!/bin/bash")][0]
    (tmp_path / "job.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sh")]).returncode == 0
    sb = dict(re.findall(r"#SBATCH --([\w-]+)=(\S+)", script))
    srun = [ln for ln in script.splitlines() if ln.startswith("srun ")][0]
    args = _medlens_args(shlex.split(srun))
    assert args[args.index("--devices") + 1] == sb["ntasks-per-node"]
    assert args[args.index("--num-nodes") + 1] == sb["nodes"]
    env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
           "SLURM_JOB_NAME": sb["job-name"], "SLURM_NODELIST": "node[0-1]", "SLURM_JOB_ID": "7",
           "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NUM_NODES": sb["nodes"]}
    out = _dry_run(_scaled(args, 2), env, capsys, monkeypatch)
    assert (out["launcher"], out["world_size"], out["rank"], out["num_nodes"]) == ("slurm", 4, 2, 2)


def test_more_devices_than_the_machine_is_one_line(capsys):
    n = (os.cpu_count() or 1) + 1
    assert main(["train", str(CFG), "--devices", str(n), "--strategy", "ddp", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"train.devices {n} is more than this machine has" in err
