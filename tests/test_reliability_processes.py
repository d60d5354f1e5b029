"""Training you can trust (issue 6), in real processes: SIGKILL during a checkpoint write, SIGINT/SIGTERM,
and a 2-process CPU run under `accelerate launch` (gloo)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cli_utils import started
from reliability_utils import (
    PAUSE_ENV,
    assert_same,
    checkpoint_state,
    checkpoint_steps,
    make_trainer,
    tiny_tree,
    write_config,
)
from safetensors.torch import load_file

from stepdistill.config import TrainConfig
from stepdistill.training.options import lr_scheduler

REPO = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    return env


@contextlib.contextmanager
def _started_paused(tree: dict, tmp_path: Path, pause: str) -> Iterator[subprocess.Popen]:
    """`stepdistill train` in a subprocess that stops at `pause` (reliability_utils.PauseAt) and waits there; killed
    when the block ends while it still runs."""
    config = write_config(tree, tmp_path / "run.yaml")
    launcher = "import sys, reliability_utils; sys.exit(reliability_utils.cli_with_pause())"
    with started([sys.executable, "-c", launcher, "train", "--config", str(config)], cwd=REPO,
                 env=_env(**{PAUSE_ENV: pause}), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        marker = Path(tree["train"]["output_dir"]) / "paused"
        deadline = time.monotonic() + 240  # a bound against hangs, not a timing assertion
        while not marker.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"the run never paused at {pause}: {proc.communicate()[1][-2000:]}")
            time.sleep(0.05)
        yield proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 12-step run that interrupted-and-resumed runs must equal bitwise."""
    out = tmp_path_factory.mktemp("uninterrupted")
    torch.set_num_threads(1)
    make_trainer(tiny_tree(out)).train()
    return out


def test_sigkill_during_checkpoint_write_then_resume(reference, tmp_path, caplog):
    out = tmp_path / "run"
    with _started_paused(tiny_tree(out), tmp_path, "save:10") as proc:  # checkpoint-10 written, not yet renamed
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint_steps(out) == [5]
    assert (out / "checkpoints" / ".tmp-checkpoint-10" / "trainer_state.json").is_file()

    with caplog.at_level(logging.WARNING, logger="stepdistill.training"):
        trainer = make_trainer(tiny_tree(out, resume="latest"))
        result = trainer.train()
    assert any("skipping incomplete checkpoint" in r.getMessage() and ".tmp-checkpoint-10" in r.getMessage()
               for r in caplog.records)
    assert result.step == 12
    assert not (out / "checkpoints" / ".tmp-checkpoint-10").exists()  # the next save removed the debris
    assert_same(checkpoint_state(reference / "checkpoints" / "checkpoint-12"),
                checkpoint_state(out / "checkpoints" / "checkpoint-12"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_then_resume_is_exact(signum, reference, tmp_path):
    out = tmp_path / "run"
    with _started_paused(tiny_tree(out), tmp_path, "step:7") as proc:
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert f"stopped by {signum.name} at step 7 after saving checkpoint-7" in err.strip().splitlines()[-1]
    assert checkpoint_steps(out) == [5, 7]
    assert not (out / "final").exists()

    make_trainer(tiny_tree(out, resume="latest")).train()
    assert checkpoint_steps(out) == [7, 10, 12]  # pruned to train.checkpoints_limit=3
    assert_same(checkpoint_state(reference / "checkpoints" / "checkpoint-12"),
                checkpoint_state(out / "checkpoints" / "checkpoint-12"))


RANK_SCRIPT = '''
import hashlib, json, sys, torch
torch.set_num_threads(1)
from reliability_utils import make_trainer, tiny_tree
from stepdistill.objectives.regression import Regression

class Recording(Regression):
    """Writes, per optimizer step, a digest of the weights and the noise rows of the batch this rank saw."""
    def loss(self, phase, batch, step):
        self.rows = [hashlib.sha1(r.numpy().tobytes()).hexdigest() for r in batch["noise"]]
        return super().loss(phase, batch, step)
    def after_step(self, phase, step):
        w = torch.cat([p.detach().flatten() for p in self.generator.parameters()])
        self.log.append({"step": step, "weights": hashlib.sha1(w.numpy().tobytes()).hexdigest(), "rows": self.rows})

tree = tiny_tree(sys.argv[1], max_steps=8, checkpoint_every=4, resume="latest")
trainer = make_trainer(tree, Recording)
trainer.objective.log = []
trainer.train()
rank = trainer.accelerator.process_index
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump(trainer.objective.log, f)
'''


def test_two_process_cpu_run(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / ".tmp-checkpoint-99").mkdir(parents=True)  # debris: warned about once, by rank 0
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # `--cpu` alone starts one process unless MPI is set up; torchrun (--multi_gpu) with the CPU forced gives
    # two processes on gloo
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(script), str(out)]
    with started(cmd, cwd=REPO, env=_env(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true"),
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:  # its ranks go with it
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    logs = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [e["step"] for e in logs[0]] == list(range(8)) == [e["step"] for e in logs[1]]
    for a, b in zip(*logs):  # identical weights on both ranks after every step, and they change
        assert a["weights"] == b["weights"]
    assert len({e["weights"] for e in logs[0]}) == 8
    for a, b in zip(*logs):  # each step: disjoint shards of 32 rows per rank
        assert len(a["rows"]) == len(b["rows"]) == 32 and not set(a["rows"]) & set(b["rows"])
    for epoch in (range(4), range(4, 8)):  # 256 pairs / (2 x 32) = 4 steps: every pair once per epoch
        rows = [r for s in epoch for log in logs for r in log[s]["rows"]]
        assert len(rows) == len(set(rows)) == 256
    # one checkpoint per save, with one copy of the weights and one RNG state per rank
    assert checkpoint_steps(out) == [4, 8]
    files = sorted(p.name for p in (out / "checkpoints" / "checkpoint-8").iterdir())
    assert files == ["ema.safetensors", "model.safetensors", "optimizer.bin", "random_states_0.pkl",
                     "random_states_1.pkl", "scheduler.bin", "trainer_state.json"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    # the LR schedule advanced once per training step, not once per process
    sched = checkpoint_state(out / "checkpoints" / "checkpoint-8")["scheduler.bin"]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
    one_process = lr_scheduler(TrainConfig(lr_scheduler="cosine", lr_warmup_steps=3, max_steps=8), opt, 1)
    for _ in range(8):
        opt.step()
        one_process.step()
    assert sched["_last_lr"][0] == pytest.approx(one_process.get_last_lr()[0])
    # logs from the main process only
    assert (stdout + stderr).count("skipping incomplete checkpoint") == 1
    weights = load_file(str(out / "final" / "generator.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
