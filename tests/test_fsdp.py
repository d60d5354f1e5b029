"""FSDP2 through `accelerate launch --config_file configs/accelerate/fsdp_cpu.yaml` with 2 gloo processes on CPU:
DMD2 with its GAN head, consistency with an EMA target and reflow train sharded; the weights equal the
one-process reference of tests/test_multiprocess.py (both ranks' halves of the batch, their own random streams,
gradients averaged), each rank holds about half of every trainable parameter and of its optimizer state, a run
SIGKILLed mid-way and resumed equals the uninterrupted one bitwise, a resume on another process count is refused,
the sharded run's export has the one-process export's files, keys and shapes, and `stepdistill export` reads a
sharded checkpoint in one process. The digits teacher's 20-iteration comparison is eval/fsdp_digits.py."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_utils import DEFAULT_SIGINT
from reliability_utils import assert_same, make_trainer, tiny_tree
from safetensors.torch import load_file
from test_multiprocess import HALF_BATCH, OBJECTIVES, one_process_reference
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from stepdistill.config import ConfigError
from stepdistill.training.accel import trainable_state_bytes
from stepdistill.training.restore import export_checkpoint

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
RUNS = {
    **OBJECTIVES,
    "dmd2_gan": {**OBJECTIVES["dmd2"], "real_data": "mixture", "gan_generator_weight": 0.1,
                 "gan_critic_weight": 0.1},
    "reflow": {"name": "reflow", "lr": 1e-3, "pairs": {"num": 64, "steps": 4}},
}

RANK_SCRIPT = '''
import json, os, signal, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
from test_fsdp import tree
from stepdistill.config import config_from_dict
from stepdistill.objectives.base import get_module
from stepdistill.training import Hook, Trainer
from stepdistill.training.accel import local, trainable_state_bytes


class KillAt(Hook):
    """SIGKILL every rank right after training step `step` (before its checkpoint, if one falls there)."""
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, logs):
        if trainer.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


for run in json.loads(sys.argv[1]):
    hooks = [KillAt(run["kill_at"])] if run.get("kill_at") else []
    trainer = Trainer(config_from_dict(tree(run["name"], run["out"], run.get("resume", ""))), hooks=hooks)
    shards = {g.name: [[local(p).numel(), p.numel()] for p in get_module(trainer.objective, g.module).parameters()]
              for g in trainer.objective.optimizer_groups()}
    trainer.train()
    with open(f"{run['out']}/rank{trainer.accelerator.process_index}.json", "w") as f:
        json.dump({"shards": shards, "bytes": trainable_state_bytes(trainer.optimizers),
                   "resumed_from": str(trainer.resume_from)}, f)
'''


def tree(name: str, out, resume: str = "") -> dict:
    ema = 0.9 if name == "dmd2_gan" else 0.0
    t = tiny_tree(out, max_steps=STEPS, batch_size=HALF_BATCH, checkpoint_every=3, ema_decay=ema,
                  lr_scheduler="constant", lr_warmup_steps=0, resume=resume)
    t["objective"] = dict(RUNS[name])
    if name == "reflow":
        t["student"] = {"kind": "copy", "schedule": "flow"}
    return t


def launch(tmp_path: Path, runs: list[dict]) -> subprocess.CompletedProcess:
    """The runs, one after the other, in 2 processes under `accelerate launch` with the FSDP2 CPU config; the
    launcher's whole process group is killed if it does not end by itself, and it starts with SIGINT at its
    default."""
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    cmd = [sys.executable, "-c", DEFAULT_SIGINT, sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs/accelerate/fsdp_cpu.yaml"), "--num_processes", "2", "--main_process_port", str(port),
           str(script), json.dumps(runs), str(REPO / "tests")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def dcp_state(folder: Path, tmp_path: Path) -> dict:
    """A torch.distributed.checkpoint folder read back whole, in this one process."""
    target = tmp_path / f"{folder.parent.parent.parent.name}-{folder.parent.name}-{folder.name}.pt"
    dcp_to_torch_save(folder, target)
    return torch.load(target, weights_only=False)


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """Two launches: consistency, reflow, and a DMD2 + GAN run SIGKILLed after step 4 (checkpoint-3 written);
    then that run resumed, and the same DMD2 + GAN run uninterrupted."""
    root = tmp_path_factory.mktemp("fsdp")
    runs = {name: str(root / name) for name in ("consistency", "reflow", "killed", "dmd2_gan")}
    first = launch(root, [{"name": "consistency", "out": runs["consistency"]}, {"name": "reflow", "out": runs["reflow"]},
                          {"name": "dmd2_gan", "out": runs["killed"], "kill_at": 4}])
    assert first.returncode != 0 and (root / "reflow" / "final").is_dir(), first.stderr[-3000:]
    killed_checkpoints = sorted(p.name for p in (root / "killed" / "checkpoints").iterdir())
    second = launch(root, [{"name": "dmd2_gan", "out": runs["killed"], "resume": "latest"},
                           {"name": "dmd2_gan", "out": runs["dmd2_gan"]}])
    assert second.returncode == 0, second.stderr[-3000:]
    return root, killed_checkpoints


@pytest.mark.parametrize("name", ["dmd2_gan", "consistency"])
def test_sharded_runs_equal_the_one_process_reference(sharded_runs, name, tmp_path):
    root, _ = sharded_runs
    torch.set_num_threads(1)
    reference = one_process_reference(name, tmp_path / "ref", tree(name, tmp_path / "ref"))
    folder = root / name / "checkpoints" / f"checkpoint-{STEPS}"
    for i, group in enumerate(reference):
        sharded = dcp_state(folder / f"pytorch_model_fsdp_{i}", tmp_path)["model"]
        assert sharded.keys() == reference[group].keys(), (name, group)
        for key, value in sharded.items():
            torch.testing.assert_close(value, reference[group][key], atol=2e-5, rtol=1e-4,
                                       msg=f"{name} {group} {key}")


@pytest.mark.parametrize("name", ["dmd2_gan", "consistency", "reflow"])
def test_every_rank_holds_about_half_of_each_trainable_module(sharded_runs, name, tmp_path):
    root, _ = sharded_runs
    ranks = [json.loads((root / name / f"rank{r}.json").read_text()) for r in (0, 1)]
    for group in ranks[0]["shards"]:
        local = [sum(n for n, _ in r["shards"][group]) for r in ranks]
        full = sum(n for _, n in ranks[0]["shards"][group])
        assert sum(local) == full, (name, group)  # disjoint shards that cover the module
        assert all(0.4 * full <= n <= 0.6 * full for n in local), (name, group, local, full)
    one = make_trainer(tree(name, tmp_path / "one"))
    one.train_steps(1)
    whole = trainable_state_bytes(one.optimizers)
    for r in ranks:  # parameters + AdamW moments: about half of one process's
        assert 0.4 * whole <= r["bytes"] <= 0.6 * whole, (name, r["bytes"], whole)


def test_sigkill_then_resume_equals_the_uninterrupted_sharded_run(sharded_runs, tmp_path):
    root, killed_checkpoints = sharded_runs
    assert killed_checkpoints == ["checkpoint-3"]
    for rank in (0, 1):
        resumed = json.loads((root / "killed" / f"rank{rank}.json").read_text())["resumed_from"]
        assert resumed == str(root / "killed" / "checkpoints" / "checkpoint-3")
    mine = root / "killed" / "checkpoints" / f"checkpoint-{STEPS}"
    theirs = root / "dmd2_gan" / "checkpoints" / f"checkpoint-{STEPS}"
    for part in ("pytorch_model_fsdp_0", "pytorch_model_fsdp_1", "optimizer_0", "optimizer_1", "ema"):
        assert_same(dcp_state(mine / part, tmp_path), dcp_state(theirs / part, tmp_path), part)
    for file in ("scheduler.bin", "scheduler_1.bin"):
        assert_same(torch.load(mine / file, weights_only=False), torch.load(theirs / file, weights_only=False))
    assert_same(load_file(str(root / "killed" / "final" / "generator.safetensors")),
                load_file(str(root / "dmd2_gan" / "final" / "generator.safetensors")))


def test_resume_on_another_process_count_is_refused(sharded_runs, tmp_path):
    root, _ = sharded_runs
    with pytest.raises(ConfigError, match=r"written by 2 processes with FSDP \(sharded\) and this run has 1 "
                                          r"process: resume with the launch that wrote it \(accelerate launch "
                                          r"--num_processes 2"):
        make_trainer(tree("dmd2_gan", tmp_path / "one", resume=str(root / "dmd2_gan" / "checkpoints" / "checkpoint-3")))


def test_sharded_export_has_the_one_process_export_format(sharded_runs, tmp_path):
    root, _ = sharded_runs
    make_trainer(tree("dmd2_gan", tmp_path / "one")).train()
    mine, theirs = root / "dmd2_gan" / "final", tmp_path / "one" / "final"
    assert sorted(p.name for p in mine.iterdir()) == sorted(p.name for p in theirs.iterdir())
    a, b = load_file(str(mine / "generator.safetensors")), load_file(str(theirs / "generator.safetensors"))
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    assert all(torch.isfinite(v).all() for v in a.values())


def test_stepdistill_export_reads_a_sharded_checkpoint_whole(sharded_runs, tmp_path):
    """`stepdistill export` of a sharded checkpoint (one process, no process group) writes the run's own export:
    the generator and its EMA read whole from the shards."""
    root, _ = sharded_runs
    summary = export_checkpoint(root / "dmd2_gan" / "checkpoints" / f"checkpoint-{STEPS}", tmp_path / "export")
    assert summary["weights"] == "ema"
    assert_same(load_file(str(tmp_path / "export" / "generator.safetensors")),
                load_file(str(root / "dmd2_gan" / "final" / "generator.safetensors")))
