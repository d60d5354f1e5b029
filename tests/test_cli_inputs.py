"""Every bad input the user's-surface issue lists, through the real command line in a subprocess: the exit code
(2 bad input, 1 failure while running, 130 interrupted) and one line naming the culprit (docs/RELIABILITY.md,
inputs 38-). Most fail before torch is imported or right after; the few that need a model use the shipped digits
teacher or the analytic one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from cli_utils import (
    DIGITS_PROMPTS,
    DIGITS_TEACHER,
    DMD2_DIGITS_CONFIG,
    assert_fails,
    cli_command,
    cli_env,
    run_cli,
    started,
)
from PIL import Image
from reliability_utils import make_trainer, tiny_tree, write_config


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """Bad inputs on disk: broken and duplicate-key YAML, a list where a section goes, a PNG, a folder, a plain
    file, pipeline folders with a list for model_index.json and with no component folders."""
    (tmp_path / "broken.yaml").write_text("train:\n  max_steps: [1\n  batch_size: 2\n")
    (tmp_path / "duplicate.yaml").write_text("train:\n  max_steps: 1\n  max_steps: 2\n")
    (tmp_path / "objective_list.yaml").write_text("objective:\n  - dmd2\n  - lcm\n")
    Image.new("RGB", (8, 8), "red").save(tmp_path / "picture.png")
    (tmp_path / "folder").mkdir()
    (tmp_path / "plain_file").write_text("not a folder\n")
    (tmp_path / "list_index").mkdir()
    (tmp_path / "list_index" / "model_index.json").write_text('["StableDiffusionPipeline", "unet"]')
    (tmp_path / "no_components").mkdir()
    (tmp_path / "no_components" / "model_index.json").write_text((DIGITS_TEACHER / "model_index.json").read_text())
    return tmp_path


RUN = "train.output_dir={tmp}/run"
# id -> (command line, exit code, culprits the one-line message must name); {tmp} is the test's folder
CASES = {
    "yaml_syntax": (["train", "--config", "{tmp}/broken.yaml"], 2, ["broken.yaml", "not valid YAML", "line 3"]),
    "duplicate_key": (["train", "--config", "{tmp}/duplicate.yaml"], 2, ["duplicate.yaml", "'max_steps'", "twice"]),
    "objective_list": (["train", "--config", "{tmp}/objective_list.yaml"], 2, ["'objective'", "mapping", "list"]),
    "png_config": (["train", "--config", "{tmp}/picture.png"], 2, ["picture.png", "not a text file"]),
    "folder_config": (["train", "--config", "{tmp}/folder"], 2, ["folder", "is a directory"]),
    "model_index_list": (["train", "teacher.kind=sd", "teacher.path={tmp}/list_index", RUN], 2,
                         ["list_index", "model_index.json holds a list"]),
    "no_component_folders": (["train", "teacher.kind=sd", "teacher.path={tmp}/no_components", RUN], 2,
                             ["no_components", "component folders", "scheduler, text_encoder, tokenizer, unet, vae",
                              "missing"]),
    "output_dir_is_file": (["train", "train.output_dir={tmp}/plain_file"], 2, ["plain_file", "is a file"]),
    "output_dir_empty": (["train", "train.output_dir="], 2, ["train.output_dir is empty"]),
    "generator_lr_inf": (["train", "--config", "dmd2_gmm", "objective.generator_lr=inf", RUN], 2,
                         ["objective.generator_lr", "finite"]),
    "real_guidance_negative": (["train", "--config", "dmd2_gmm", "objective.real_guidance=-2", RUN], 2,
                               ["objective.real_guidance must be >= 0", "-2"]),
    "fp16_on_cpu": (["train", "train.mixed_precision=fp16", RUN], 2,
                    ["train.mixed_precision=fp16", "CUDA GPU", "train.mixed_precision=no"]),
    "png_prompts": (["train", "data.prompts_file={tmp}/picture.png", RUN], 2, ["prompts file", "picture.png"]),
    "folder_prompts": (["train", "data.prompts_file={tmp}/folder", RUN], 2, ["prompts file", "folder",
                                                                            "is a directory"]),
    "eval_out_is_file": (["eval", "{tmp}/folder", "--out", "{tmp}/plain_file"], 2, ["--out", "plain_file",
                                                                                  "is a file"]),
    "eval_num_samples_negative": (["eval", "{tmp}/folder", "--num-samples", "-3"], 2, ["--num-samples", ">= 1"]),
    "eval_num_samples_zero": (["eval", "{tmp}/folder", "--num-samples", "0"], 2, ["--num-samples", ">= 1"]),
    "eval_guidance_negative": (["eval", "{tmp}/folder", "--guidance", "-5"], 2, ["--guidance", ">= 0"]),
    "demo_eval_per_digit_zero": (["demo", "--eval-per-digit", "0"], 2, ["--eval-per-digit", ">= 1"]),
    "plan_gpu_gib_negative": (["plan", "--gpu-gib", "-5"], 2, ["--gpu-gib", "> 0"]),
    "sample_not_a_folder": (["sample", "{tmp}/plain_file", "a cat", "--out", "{tmp}/samples"], 2,
                            ["plain_file", "not a folder"]),
    "export_not_a_checkpoint": (["export", "{tmp}/folder", "--out", "{tmp}/export"], 2,
                                ["folder", "neither a checkpoint", "nor a run folder"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_naming_the_culprit(case, files):
    args, code, culprits = CASES[case]
    proc = run_cli(*[a.format(tmp=files) for a in args], cwd=files)
    assert_fails(proc, code, *[c.format(tmp=files) for c in culprits])
    assert not (files / "run").exists()  # refused before any work


def test_timesteps_outside_the_teachers_schedule_fail_before_training(tmp_path):
    """student.timesteps=[1000] on an SD teacher (model timesteps 0..999) trained fully, then failed at export."""
    proc = run_cli("train", "--config", DMD2_DIGITS_CONFIG, f"teacher.path={DIGITS_TEACHER}",
                   f"data.prompts_file={DIGITS_PROMPTS}", "student.timesteps=[1000]",
                   f"train.output_dir={tmp_path}/run",
                   cwd=tmp_path)
    assert_fails(proc, 2, "student.timesteps [1000]", "[1000] lie outside", "[0, 999]", "student.timesteps=[999]")
    assert not list((tmp_path / "run").glob("checkpoints/*")) and not (tmp_path / "run" / "final.tmp").exists()


def test_corrupt_latest_checkpoint_is_named_and_latest_valid_resumes_the_intact_one(tmp_path):
    tree = tiny_tree(tmp_path / "run", max_steps=8, checkpoint_every=4)
    make_trainer(tree).train()  # checkpoints 4 and 8
    newest = tmp_path / "run" / "checkpoints" / "checkpoint-8" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    config = write_config(tree, tmp_path / "run.yaml")
    proc = run_cli("train", "--config", config, "train.resume=latest", cwd=tmp_path)
    assert_fails(proc, 2, "checkpoint-8 is corrupt", "model.safetensors", "checkpoint-4 is intact",
                 "train.resume=latest-valid")
    proc = run_cli("train", "--config", config, "train.resume=latest-valid", "train.max_steps=10", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping corrupt checkpoint" in proc.stderr and "resumed from checkpoint-4 at step 4" in proc.stderr
    assert json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-10" / "trainer_state.json").read_text())[
        "step"] == 10


@contextmanager
def mounted_tmpfs(folder: Path, options: str):
    """A small tmpfs at `folder` (root only): a real full or read-only file system."""
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                          check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@contextmanager
def read_only_folder(folder: Path):
    if os.geteuid() != 0:  # permission bits hold for other users; root needs a read-only file system
        folder.mkdir()
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    with mounted_tmpfs(folder, "size=1m,ro") as mounted:
        yield mounted


def test_read_only_output_dir_is_refused_before_work(tmp_path):
    with read_only_folder(tmp_path / "locked") as locked:
        proc = run_cli("train", f"train.output_dir={locked}/run", cwd=tmp_path)
    assert_fails(proc, 2, "train.output_dir", str(locked), "cannot be written")


@pytest.mark.skipif(os.geteuid() != 0, reason="a full disk is simulated with a small tmpfs, which needs root")
def test_full_disk_is_one_line_saying_what_was_saved(tmp_path):
    config = write_config(tiny_tree(tmp_path / "full" / "run"), tmp_path / "run.yaml")
    with mounted_tmpfs(tmp_path / "full", "size=96k"):
        proc = run_cli("train", "--config", config, cwd=tmp_path)
        left = sorted(p.name for p in (tmp_path / "full" / "run" / "checkpoints").iterdir())
    assert_fails(proc, 1, "writing checkpoint-", "MiB free on that disk", "free space")
    assert not [name for name in left if name.startswith(".tmp")]  # the partial checkpoint was removed


def test_ctrl_c_during_pair_generation_keeps_only_finished_shards(tmp_path):
    """The cache appears only when complete; finished shards stay in pairs.partial for the next run to continue
    from (tests/test_distributed_pairs.py), and no half-written shard is left."""
    out = tmp_path / "run"
    with started(cli_command("train", "--config", "regression_gmm", "objective.pairs.num=5000000",
                             f"train.output_dir={out}"), cwd=tmp_path, env=cli_env(),
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        deadline = time.monotonic() + 300
        while not (out / "pairs.partial").is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # inside the teacher's sampler
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    assert_fails(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), 130,
                 "interrupted (Ctrl-C)", "no checkpoint was written", "temporary files were removed")
    assert not (out / "pairs").exists() and not list((out / "pairs.partial").glob(".*.tmp"))
    assert "shards are finished in" in stderr


def test_help_imports_no_torch_and_version_answers(tmp_path):
    proc = subprocess.run([*cli_command("train", "--help")[:1], "-X", "importtime",
                           *cli_command("train", "--help")[1:]], cwd=tmp_path, env=cli_env(), capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0 and "--config" in proc.stdout
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "stepdistill.cli" in imported and not {"torch", "numpy", "diffusers", "accelerate"} & imported
    proc = run_cli("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("stepdistill ")


def test_ctrl_c_in_demo_is_one_line_saying_what_was_saved(tmp_path):
    """Ctrl-C in `demo` used to save a checkpoint and then print a RuntimeError traceback with exit 1. The demo is a
    recipe (regression, then DMD2): the stopped stage says where it saved and that the same command continues."""
    log = tmp_path / "stderr.txt"
    command = cli_command("demo", "train.max_steps=100000", "train.checkpoint_every=100000", "objective.pairs.num=64",
                          "objective.pairs.steps=2")
    with log.open("w") as stderr, started(command, cwd=tmp_path, env=cli_env(TQDM_DISABLE=None),
                                          stdout=subprocess.PIPE, stderr=stderr, text=True) as proc:
        deadline = time.monotonic() + 300  # the progress bars (on) say when the training loop runs
        while "step/s" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=300)
    last = assert_fails(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, log.read_text()), 130,
                        "recipe stage regression stopped", "after saving checkpoint-", "run the same command")
    step = int(last.split("after saving checkpoint-")[1].split()[0])
    stage = tmp_path / "runs" / "demo" / "regression"
    assert (stage / "checkpoints" / f"checkpoint-{step}").is_dir()
    assert not (stage / "final").exists() and not (stage.parent / "dmd2").exists()  # no export of an unfinished run


def test_teacher_rebuilt_into_the_same_folder_gets_a_new_fid_reference(tmp_path):
    """`teacher digits --out X` run twice with different settings used to keep the first teacher's FID reference."""
    import shutil

    import numpy as np

    classifier = tmp_path / "classifier"
    shutil.copytree(DIGITS_TEACHER.parent / "digits_classifier", classifier)  # reused, not retrained
    out = tmp_path / "teacher"
    means = []
    for seed in (3, 4):
        proc = run_cli("teacher", "digits", "--seed", seed, "--vae-steps", 2, "--unet-steps", 2,
                       "--eval-per-digit", 1, "--reference-per-digit", 1, "--device", "cpu",
                       "--classifier-out", classifier, "--out", out, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        means.append(np.load(out / "digits_reference.npz")["teacher_mu"])
    assert not np.allclose(means[0], means[1])  # the second teacher's samples, not the first's
