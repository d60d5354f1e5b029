"""Teacher pairs on several processes: a generation SIGKILLed after half its shards resumes on two processes
(`accelerate launch -m stepdistill pairs`, gloo on CPU) without redoing a finished shard, and the cache equals,
bit for bit, the one a single uninterrupted process makes: every pair's condition and noise come from its index."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from cli_utils import assert_fails, run_cli, started
from safetensors.torch import load_file

from stepdistill.config import config_from_dict
from stepdistill.data.pairs import PairProcesses, draw_pairs, split_across
from stepdistill.objectives import build_objective

REPO = Path(__file__).resolve().parents[1]
NUM, SHARD = 48, 8  # six shards of eight pairs
# the killed run: a single process that stops for good after writing its third shard (the test SIGKILLs it there)
KILLED = '''
import sys, time
from pathlib import Path
import stepdistill.data.pairs as pairs
from stepdistill.cli import main

written, save = [], pairs.save_tensors_atomic
def save_then_stop(tensors, path):
    save(tensors, path)
    written.append(path)
    if len(written) == 3:
        Path(sys.argv[1]).touch()
        time.sleep(600)
pairs.save_tensors_atomic = save_then_stop
sys.exit(main(sys.argv[2:]))
'''


def tree(out: Path) -> dict:
    return {"objective": {"name": "regression", "pairs": {"num": NUM, "steps": 3}},
            "teacher": {"kind": "gmm", "num_modes": 4, "backbone_hidden": 16, "backbone_depth": 1},
            "student": {"kind": "copy", "timesteps": [999], "prediction_type": "sample"},
            "train": {"output_dir": str(out), "report_to": "none", "device_threads": 1}}


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def cache(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {f.name: load_file(str(f)) for f in sorted(folder.glob("pairs-*.safetensors"))}


def test_pair_noise_depends_on_its_index_only():
    """The pairs 8..15 drawn alone equal the same pairs drawn as part of 0..47."""
    index, noise = draw_pairs(3, 0, NUM, 4, (2,))
    index_part, noise_part = draw_pairs(3, SHARD, 2 * SHARD, 4, (2,))
    assert torch.equal(index[SHARD:2 * SHARD], index_part) and torch.equal(noise[SHARD:2 * SHARD], noise_part)
    assert not torch.equal(draw_pairs(4, 0, NUM, 4, (2,))[1], noise)  # the seed matters
    assert len({tuple(row.tolist()) for row in noise}) == NUM  # no two pairs share a stream


def test_killed_generation_resumes_on_two_processes_and_equals_one_process(tmp_path):
    # the reference: one process, uninterrupted, in this process
    objective = build_objective(config_from_dict(tree(tmp_path / "one")))
    with split_across(PairProcesses(shard_size=SHARD, batch_size=SHARD)) as one:
        objective.prepare_data(str(tmp_path / "one"), "cpu")
    reference = cache(one.made[0])
    assert len(reference) == NUM // SHARD

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tree(tmp_path / "run")))
    args = ["pairs", "--config", str(config), "--shard-size", str(SHARD), "--batch-size", str(SHARD)]
    paused = tmp_path / "paused"
    with started([sys.executable, "-c", KILLED, str(paused), *args], cwd=tmp_path, env=env(),
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        deadline = time.monotonic() + 300  # a bound against hangs, not a timing assertion
        while not paused.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    partial = tmp_path / "run" / "pairs.partial"
    finished = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in partial.glob("pairs-*.safetensors")}
    assert len(finished) == 3 and not (tmp_path / "run" / "pairs").exists()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(port), "-m", "stepdistill", *args, "--json"]
    with started(launch, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert json.loads(stdout)["processes"] == 2  # one summary: the main process reports for the launch

    final = tmp_path / "run" / "pairs"
    for name, stamp in finished.items():  # the finished shards were kept, not rewritten
        assert ((final / name).stat().st_ino, (final / name).stat().st_mtime_ns) == stamp
    resumed = cache(final)
    assert resumed.keys() == reference.keys()
    for name, tensors in reference.items():
        assert resumed[name].keys() == tensors.keys()
        for key, value in tensors.items():
            assert torch.equal(resumed[name][key], value), (name, key)
    assert (final / "meta.json").read_text() == (one.made[0] / "meta.json").read_text()
    assert not partial.exists() and (tmp_path / "run" / "config.json").is_file()  # `train` continues here


def test_pairs_refuses_an_objective_without_pairs(tmp_path):
    """Consistency distillation on the analytic teacher's own samples (objective.data=real) makes no pairs."""
    config = tmp_path / "real.yaml"
    t = tree(tmp_path / "real")
    t["objective"] = {"name": "consistency", "data": "real"}
    config.write_text(yaml.safe_dump(t))
    proc = run_cli("pairs", "--config", config, cwd=tmp_path)
    assert_fails(proc, 2, "objective consistency caches no teacher pairs")


# a run that pauses after its first shard until `go` exists
PAUSED = '''
import sys, time
from pathlib import Path
import stepdistill.data.pairs as pairs
from stepdistill.cli import main

save = pairs.save_tensors_atomic
def save_then_wait(tensors, path):
    save(tensors, path)
    Path(sys.argv[1]).touch()
    while not Path(sys.argv[2]).exists():
        time.sleep(0.05)
pairs.save_tensors_atomic = save_then_wait
sys.exit(main(sys.argv[3:]))
'''
# a run that marks the moment it asks for the pair folder's lock
ASKS_LOCK = '''
import sys
from pathlib import Path
import stepdistill.data.pairs as pairs
from stepdistill.cli import main

flock = pairs.fcntl.flock
def marked_flock(fd, op):
    Path(sys.argv[1]).touch()
    return flock(fd, op)
pairs.fcntl.flock = marked_flock
sys.exit(main(sys.argv[2:]))
'''


def test_two_runs_sharing_a_pair_folder_make_it_once(tmp_path):
    """Two independent runs (a sweep's seeds) pointed at one objective.pairs.dir: the second waits for the
    first's lock while the first is mid-way, then reuses its cache; both succeed and the cache equals one made
    alone (before the lock, the second rewrote the first's half-made folder and one of them failed)."""
    shared = tmp_path / "pairs" / "shared"
    configs = []
    for name in ("a", "b"):
        t = tree(tmp_path / name)
        t["objective"]["pairs"]["dir"] = str(shared)
        configs.append(tmp_path / f"{name}.yaml")
        configs[-1].write_text(yaml.safe_dump(t))
    reference_objective = build_objective(config_from_dict(tree(tmp_path / "one")))
    with split_across(PairProcesses(shard_size=SHARD, batch_size=SHARD)) as one:
        reference_objective.prepare_data(str(tmp_path / "one"), "cpu")
    args = ["--shard-size", str(SHARD), "--batch-size", str(SHARD)]
    mid, go, asked = tmp_path / "mid", tmp_path / "go", tmp_path / "asked"
    popen = {"cwd": tmp_path, "env": env(), "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    with started([sys.executable, "-c", PAUSED, str(mid), str(go), "pairs", "--config", str(configs[0]), *args],
                 **popen) as a:
        deadline = time.monotonic() + 300  # bounds against hangs, not timing assertions
        while not mid.exists():
            assert a.poll() is None and time.monotonic() < deadline, a.communicate()[1][-3000:]
            time.sleep(0.1)
        with started([sys.executable, "-c", ASKS_LOCK, str(asked), "pairs", "--config", str(configs[1]), *args],
                     **popen) as b:
            while not asked.exists():  # b reached the lock while a holds it mid-way
                assert b.poll() is None and time.monotonic() < deadline, b.communicate()[1][-3000:]
                time.sleep(0.1)
            go.touch()
            err_a = a.communicate(timeout=600)[1]
            err_b = b.communicate(timeout=600)[1]
    assert a.returncode == 0, err_a[-3000:]
    assert b.returncode == 0, err_b[-3000:]
    assert not shared.with_name("shared.partial").exists()
    made, reference = cache(shared), cache(one.made[0])
    assert made.keys() == reference.keys() and len(made) == NUM // SHARD
    for name, tensors in reference.items():
        for key, value in tensors.items():
            assert torch.equal(made[name][key], value), (name, key)
