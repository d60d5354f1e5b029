"""Inputs a newcomer got wrong and output a newcomer could not read, through the real command line: unclear
messages now name the problem and the fix, silently accepted inputs are refused, and the output says what it is
(a labelled demo grid, a plan table without diffusers' warnings, the metrics at the end of a miniature run,
skipped recipe stages, comparable benchmark rows). One short digits run (module fixture) serves the checks that
need one of our exports."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from cli_utils import DIGITS_TEACHER, assert_fails, run_cli
from PIL import Image

RUN = "train.output_dir={tmp}/run"
# id -> (command line, culprits of the one-line message, exit 2); {tmp} is the test's folder
CASES = {
    "section_given_a_value": (["train", "train=5", "train.output_dir=x"], ["override train=5", "train is a section",
                                                                          "train.max_steps="]),
    "preset_typo": (["train", "--config", "vsd_gnm"], ["vsd_gnm", "Did you mean vsd_gmm?"]),
    "choice_typo": (["train", "--config", "vsd_gmm", "objective.name=vds", RUN], ["objective.name", "'vds'",
                                                                               "Did you mean vsd?"]),
    "empty_config": (["train", "--config", "{tmp}/empty.yaml", RUN], ["config file", "empty.yaml", "is empty"]),
    "comments_only_config": (["train", "--config", "{tmp}/comments.yaml", RUN], ["comments.yaml", "is empty"]),
    "config_twice": (["train", "--config", "vsd_gmm", "--config", "dmd2_gmm", RUN], ["--config is given twice",
                                                                                      "'vsd_gmm'", "'dmd2_gmm'"]),
    "plan_config_twice": (["plan", "--config", "vsd_gmm", "--config", "dmd2_gmm"], ["--config is given twice"]),
    "resume_missing": (["train", "--config", "vsd_gmm", "train.resume={tmp}/nope", RUN],
                       ["train.resume {tmp}/nope does not exist", "train.resume=latest"]),
    "eval_resolution_ignored": (["eval", str(DIGITS_TEACHER), "--resolution", "7", "--out", "{tmp}/eval"],
                                ["--resolution", "COCO presets", "16 px"]),
}


def run_main(capsys, *args: object) -> tuple[int, str]:
    """The command line in this process (no second interpreter to start): exit code and stderr."""
    from stepdistill.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    printed = capsys.readouterr()
    assert printed.out == ""  # --json alone writes stdout
    return code, printed.err


def assert_refused(code: int, err: str, *culprits: str) -> None:
    """Exit 2 and a last line `stepdistill: error: ...` holding every culprit."""
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("stepdistill: error: "), err[-3000:]
    for culprit in culprits:
        assert culprit in last, f"{culprit!r} not in {last!r}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_unclear_or_silent_input_is_one_line_naming_it(case, tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "comments.yaml").write_text("# train:\n#   max_steps: 10\n")
    args, culprits = CASES[case]
    proc = run_cli(*[a.format(tmp=tmp_path) for a in args], cwd=tmp_path)
    assert_fails(proc, 2, *[c.format(tmp=tmp_path) for c in culprits])
    assert not (tmp_path / "run").exists() and not (tmp_path / "eval").exists()  # refused before any work


def test_yaml_no_is_the_word_no_where_a_choice_holds_it(tmp_path):
    """The fp16-on-CPU message suggests train.mixed_precision=no, which YAML reads as False."""
    from stepdistill.config import load_config

    (tmp_path / "c.yaml").write_text("train:\n  mixed_precision: no\n")
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(tmp_path / "c.yaml").train.mixed_precision == "no"


def test_overwrite_refuses_the_working_folder_and_moves_nothing(tmp_path, capsys, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "mine.txt").write_text("a user's file")
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.chdir(tmp_path)
    code, err = run_main(capsys, "train", "--config", "vsd_gmm", "train.output_dir=.", "train.overwrite=true")
    assert_refused(code, err, "train.output_dir .", "working folder", "train.output_dir=runs/my_run")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not list(tmp_path.parent.glob(f"{tmp_path.name}.replaced-*"))


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / ".stepdistill.lock", os.O_RDWR | os.O_CREAT)  # another open file: flock conflicts with it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a training process holds
        code, err = run_main(capsys, "train", "--config", "vsd_gmm", f"train.output_dir={run}", "train.max_steps=1")
    finally:
        os.close(fd)
    assert_refused(code, err, f"train.output_dir {run} is in use by another training process", "choose another")
    assert not (run / "config.json").exists()


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_eval_names_missing_or_truncated_weights_and_the_fix(damage, tmp_path, capsys):
    folder = tmp_path / "pipe"
    shutil.copytree(DIGITS_TEACHER, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    code, err = run_main(capsys, "eval", folder, "--out", tmp_path / "eval")
    culprit = "unet/ holds no weights file" if damage == "missing" else \
        "unet/diffusion_pytorch_model.safetensors is truncated or corrupt"
    assert_refused(code, err, str(folder), culprit, "write it again")


# ---------------------------------------------------------------------------------------------- one digits run
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> tuple[Path, str]:
    """A one-update VSD student of the shipped digits teacher, trained by the command line: (run folder, stderr)."""
    tmp = tmp_path_factory.mktemp("digits")
    proc = run_cli("train", "--config", "vsd_digits", f"train.output_dir={tmp}/run", "train.max_steps=1",
                   "train.batch_size=2", "train.num_validation_samples=1", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run", proc.stderr


def test_a_miniature_run_ends_with_the_demos_metrics(digits_run):
    run, stderr = digits_run
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["steps"] == 1 and saved["metrics"]["num_samples"] == 500  # the demo's 50 per class
    assert 0 <= saved["metrics"]["prompt_accuracy"] <= 1 and saved["metrics"]["fid_vs_teacher50"] > 0
    assert "| model | steps | CFG | prompt accuracy | FID vs teacher 50-step |" in stderr
    assert f"{saved['metrics']['fid_vs_teacher50']:.2f}" in stderr
    assert "should be kept in float32" not in stderr


def test_eval_refuses_a_preset_of_another_world(digits_run, tmp_path):
    run, _ = digits_run
    proc = run_cli("eval", run / "final", "--preset", "shapes", "--out", tmp_path / "eval", cwd=tmp_path)
    assert_fails(proc, 2, "--preset shapes", "is a digits model", "--preset digits")


def test_a_one_step_student_is_refused_as_teacher(digits_run, tmp_path):
    run, _ = digits_run
    proc = run_cli("train", "--config", "vsd_digits", f"teacher.path={run / 'final'}",
                   f"train.output_dir={tmp_path}/run", cwd=tmp_path)
    assert_fails(proc, 2, f"teacher.path {run / 'final'} is a one-step student", "multi-step teacher",
                 f"teacher.path={DIGITS_TEACHER}")


def test_sample_counts_its_images_and_caps_the_grid(digits_run, tmp_path):
    run, _ = digits_run
    proc = run_cli("sample", run / "final", "a handwritten digit seven", "--num", "10", "--out", tmp_path / "s",
                   cwd=tmp_path, TQDM_DISABLE=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "10/10" in proc.stderr  # one progress bar over every image
    assert len(list((tmp_path / "s").glob("00-*-seed*.png"))) == 10
    from stepdistill.sample import GRID_SEEDS
    from stepdistill.visualize import MIN_TILE, PAD

    width = Image.open(tmp_path / "s" / "grid.png").width
    assert GRID_SEEDS * (MIN_TILE + 2 * PAD) <= width < 10 * (MIN_TILE + 2 * PAD)


# ---------------------------------------------------------------------------------------------- output
def test_demo_grid_names_its_rows_and_prompts(tmp_path):
    from stepdistill.miniature import get_dataset
    from stepdistill.miniature.demo import samples_grid
    from stepdistill.visualize import MIN_TILE, PAD

    digits = get_dataset("digits")
    labels = digits.balanced_labels(1)
    rows = {name: torch.ones(len(labels), 3, 16, 16) for name in ("teacher 50 steps", "teacher 1 step",
                                                                   "student 1 step")}
    image = Image.open(samples_grid(rows, digits, labels, tmp_path / "samples.png")).convert("L")
    tile = MIN_TILE + 2 * PAD
    left, top = image.width - len(labels) * tile, image.height - 3 * tile
    assert left > 0 and top > 0  # room for the row names and the prompts
    assert image.crop((0, top, left, image.height)).getextrema()[0] < 128  # row names written
    assert image.crop((left, 0, image.width, top)).getextrema()[0] < 128  # prompts written


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_plan_prints_a_table_without_diffusers_float32_warnings(capsys):
    diffusers_log, records = logging.getLogger("diffusers"), _Records()  # its handler holds the real stderr
    diffusers_log.addHandler(records)
    try:
        code, err = run_main(capsys, "plan", "--config", "regression_sd15", "--model", "tiny-sd")
    finally:
        diffusers_log.removeHandler(records)
    assert code == 0, err[-3000:]
    assert not [m for m in records.messages if "should be kept in float32" in m]
    lines = err.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["option", "fits", "total"])
    assert lines[header + 1].split()[:3] == ["as", "configured", "yes"]
    assert "recommendation: as configured" in err


def test_a_rerun_recipe_says_which_stages_it_skipped(tmp_path, capsys):
    args = ["train", "--config", "reflow_gmm", "--stage", "rf2", f"train.output_dir={tmp_path}/run",
            "train.max_steps=2", "train.batch_size=8", "objective.pairs.num=16", "objective.pairs.steps=2",
            "train.num_validation_samples=8", "train.progress=false"]
    code, err = run_main(capsys, *args)
    assert code == 0 and "skipped" not in err, err[-3000:]
    code, err = run_main(capsys, *args)
    assert code == 0, err[-3000:]
    assert f"stage rf2 had finished in {tmp_path}/run/rf2 with this config: skipped" in err


def test_timing_excludes_a_warm_up_longer_than_the_fixed_one():
    """The first benchmark row timed its warm-up: a call slower than the next ones must not count."""
    from stepdistill.perf.timing import median_time

    now, durations = [0.0], iter([5.0, 3.0] + [0.1] * 20)

    def step() -> None:
        now[0] += next(durations)

    assert median_time(step, torch.device("cpu"), warmup=1, iters=2, clock=lambda: now[0]) == pytest.approx(0.1)
