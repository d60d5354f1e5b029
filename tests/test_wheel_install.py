"""The package as a user installs it: a wheel built from this tree, installed into a fresh venv (the test's own
torch and diffusers visible through a .pth of its site-packages folders, stepdistill itself only from the wheel),
used from a folder outside the repository: the presets resolve by name from the installed package data, every
shipped preset passes its checks, and train, sample, export and bench run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_utils import REPO
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stepdistill.config import preset_names

IGNORED = shutil.ignore_patterns(".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                 ".ruff_cache", ".device", ".venv", "tests")


def site_folders() -> list[str]:
    """The site-packages folders of the interpreter running the tests (where the README's install put torch and
    the rest); a .pth lists them without running their own .pth files, so an editable stepdistill stays out."""
    return [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> tuple[Path, dict]:
    """(the venv's bin folder, the environment to run it in: no PYTHONPATH, the venv first on PATH)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=IGNORED)  # the build writes egg-info beside the sources, not in the repo
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(root / "dist"),
                    str(source)], check=True, capture_output=True)
    wheel = next((root / "dist").glob("stepdistill-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    # --system-site-packages would show the base interpreter's packages, not those of a venv running this test
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "environment_under_test.pth").write_text("\n".join(site_folders()) + "\n")
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", "--force-reinstall", "-q",
                    str(wheel)], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{root / 'venv' / 'bin'}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1")
    return root / "venv" / "bin", env


def test_wheel_in_a_fresh_venv_trains_samples_exports_and_benches(venv, tmp_path):
    bin_dir, env = venv
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True, timeout=1200,
                              check=False)
        assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        return proc

    where = run(str(bin_dir / "python"), "-c",
                "import stepdistill; print(stepdistill.__file__, stepdistill.__version__)")
    location, version = where.stdout.split()
    assert Path(location).is_relative_to(bin_dir.parent) and version != "0.0.0+unknown"  # the wheel, not the repo

    offline = [name for name in preset_names() if name.endswith(("_digits", "_gmm"))
               and name not in ("dmd2_warm_gan_digits", "fdistill_digits")]  # those need real digits first
    checked = run(str(bin_dir / "python"), str(REPO / "tests" / "preset_preflight.py"), *offline)
    assert checked.stdout.split() == offline

    stepdistill = str(bin_dir / "stepdistill")
    run(stepdistill, "train", "--config", "regression_gmm", "train.max_steps=50")
    assert (work / "runs" / "regression_gmm" / "final" / "student.json").is_file()
    log = EventAccumulator(str(next((work / "runs" / "regression_gmm" / "logs").rglob("events.out.tfevents.*"))))
    log.Reload()  # tensorboard by default where installed: the schedule, the loss, the mixture metrics, the scatter
    assert {"lr/generator", "generator/loss", "metrics/energy", "metrics/sw2"} <= set(log.Tags()["scalars"])
    assert log.Tags()["images"] == ["samples"]
    summary = json.loads(run(stepdistill, "sample", "runs/regression_gmm/final", "--num", "256", "--json").stdout)
    assert (work / "samples" / "scatter.png").is_file() and summary["num"] == 256
    assert len((work / "samples" / "points.csv").read_text().splitlines()) == 257
    run(stepdistill, "export", "runs/regression_gmm", "--out", "exported")
    exported = load_file(str(work / "exported" / "generator.safetensors"))
    final = load_file(str(work / "runs" / "regression_gmm" / "final" / "generator.safetensors"))
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    run(stepdistill, "bench", "--preset", "tiny", "--out", "bench")
    speed = json.loads((work / "bench" / "speed.json").read_text())
    assert speed["training"] and speed["sampling"] and not speed["errors"]
