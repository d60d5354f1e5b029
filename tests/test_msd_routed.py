"""Multi-student distillation end to end on a tiny SD1.5 pipeline, through the CLI: a 2-student recipe (one DMD2
student per half of the prompts, then the route stage) is killed in the middle of the second student, resumes without
retraining the first, and writes one routed export that `load_exported` returns as a RoutedPipeline; a mixed batch
comes back in order, each image its own student's sample on the same noise; each student alone loads with plain
diffusers. Students can also be trained by separate launches (`--stage`), e.g. one per GPU group."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline

from stepdistill.cli import main
from stepdistill.config import ConfigError, read_config_tree
from stepdistill.data.partition import load_partition
from stepdistill.pipelines import load_exported
from stepdistill.pipelines.routed import RoutedPipeline
from stepdistill.recipes import plan_stages
from stepdistill.recipes.runner import stage_config
from stepdistill.teachers.tiny import save_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "a red sports car", "a bowl of fruit", "a lighthouse at sunset", "a city at night",
           "an old man with a beard"]
# a subprocess `stepdistill train` that stops (and waits to be killed) after step 3 of the second student
LAUNCHER = """
import sys, time
from stepdistill.cli import main
from stepdistill.config import ConfigError, read_config_tree
from stepdistill.training import DEFAULT_HOOKS, Hook

class PauseInSecondStudent(Hook):
    def on_step_end(self, trainer, logs):
        if trainer.output_dir.name == "student-1" and trainer.step == 3:
            (trainer.output_dir.parent / "paused").touch()
            time.sleep(300)

DEFAULT_HOOKS.append(PauseInSecondStudent)
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return save_tiny_pipeline("sd", tmp_path_factory.mktemp("tiny") / "sd")


def write_config(teacher: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    tree = {
        "objective": {"name": "dmd2", "generator_lr": 1e-3, "critic_lr": 1e-3, "weight_decay": 0.0,
                      "critic_updates": 2, "real_guidance": 2.0},
        "teacher": {"kind": "sd", "path": str(teacher)},
        "student": {"kind": "copy", "timesteps": [999]},
        "data": {"prompts_file": str(folder / "prompts.txt"), "partition": {"parts": 2}},
        "train": {"output_dir": str(folder / "run"), "max_steps": 4, "batch_size": 2, "checkpoint_every": 2,
                  "report_to": "none", "progress": False, "num_validation_samples": 2, "mixed_precision": "no",
                  "device_threads": 1},
        "recipe": [{"name": "student", "for_each": {"data.partition.part": [0, 1]}},
                   {"name": "routed", "route": "student"}],
    }
    path = folder / "msd.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_killed_in_the_second_student_resumes_and_routes_a_mixed_batch(tiny_sd, tmp_path):
    config = write_config(tiny_sd, tmp_path)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, "train", "--config", str(config)], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # a bound against hangs, not a timing assertion
    while not (run / "paused").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run never reached the second student: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / "student-0" / "stage.json").is_file() and not (run / "student-1" / "final").exists()
    first, checkpoint = mtimes(run / "student-0"), mtimes(run / "student-1" / "checkpoints" / "checkpoint-2")

    assert main(["train", "--config", str(config)]) == 0
    assert mtimes(run / "student-0") == first  # the first student was not trained again
    assert mtimes(run / "student-1" / "checkpoints" / "checkpoint-2") == checkpoint  # resumed from it
    assert (run / "student-1" / "checkpoints" / "checkpoint-4").is_dir()

    routed = run / "routed" / "final"
    pipe, recipe = load_exported(routed)
    assert isinstance(pipe, RoutedPipeline) and recipe["product"] == "routed" and recipe["num_students"] == 2
    assert load_partition(routed / "partition").same_as(load_partition(run / "student-1" / "partition"))
    shared = ["scheduler", "text_encoder", "tokenizer", "vae"]  # once, and linked from each student's folder
    assert sorted(p.name for p in routed.iterdir()) == sorted(["README.md", "partition", "stepdistill.json",
                                                               "students", *shared])
    assert all((routed / "students" / "1" / name).resolve() == (routed / name).resolve() for name in shared)

    parts = pipe.route(PROMPTS)
    order = torch.argsort(parts, stable=True).flip(0)  # a batch that mixes the two students' prompts
    prompts = [PROMPTS[i] for i in order]
    assert set(parts.tolist()) == {0, 1}
    noise = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = recipe["pipeline_kwargs"]
    images = pipe(prompts, latents=noise.clone(), output_type="latent", **kwargs).images
    students = [StableDiffusionPipeline.from_pretrained(str(routed / f"students/{k}")) for k in (0, 1)]
    own = [StableDiffusionPipeline.from_pretrained(str(run / f"student-{k}" / "final")) for k in (0, 1)]
    for i, prompt in enumerate(prompts):
        k = int(parts[order[i]])
        expected = own[k](prompt, latents=noise[i:i + 1].clone(), output_type="latent", **kwargs).images
        torch.testing.assert_close(images[i:i + 1], expected, atol=1e-4, rtol=1e-4)
        alone = students[k](prompt, latents=noise[i:i + 1].clone(), output_type="latent", **kwargs).images
        torch.testing.assert_close(alone, expected, atol=1e-4, rtol=1e-4)
        other = own[1 - k](prompt, latents=noise[i:i + 1].clone(), output_type="latent", **kwargs).images
        assert (other - expected).abs().max() > 1e-3  # the students differ, so routing matters


@pytest.mark.slow
def test_students_trained_by_separate_launches_are_routed_by_the_full_run(tiny_sd, tmp_path):
    """The parallel layout (one launch per student, e.g. `accelerate launch --gpu_ids ...` per GPU group), here as
    two concurrent CPU processes; the full run then skips both and writes the routed export."""
    config = write_config(tiny_sd, tmp_path)
    assert main(["train", "--config", str(config), "--stage", "routed"]) == 2  # students not trained yet
    launches = [subprocess.Popen([sys.executable, "-m", "stepdistill.cli", "train", "--config", str(config),
                                  "--stage", f"student-{k}"], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    for proc in launches:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    run = tmp_path / "run"
    assert not (run / "routed").exists()
    students = {k: mtimes(run / f"student-{k}") for k in (0, 1)}
    assert main(["train", "--config", str(config)]) == 0
    assert {k: mtimes(run / f"student-{k}") for k in (0, 1)} == students
    pipe, _ = load_exported(run / "routed" / "final")
    assert sorted(set(pipe.route(PROMPTS).tolist())) == [0, 1]


@pytest.mark.parametrize("preset,routes", [("msd_gmm", ["student-0", "student-1", "student-2", "student-3"]),
                                           ("msd_sd15", ["adm-0", "adm-1", "adm-2", "adm-3"]),
                                           ("msd_sd15_smaller", ["dm-0", "dm-1", "dm-2", "dm-3"])])
def test_presets_fan_out_one_student_per_part_and_route_them(preset, routes):
    stages = plan_stages(read_config_tree(preset))
    by_name = {s.name: s for s in stages}
    assert stages[-1].routes == routes
    parts = [stage_config(by_name[name], by_name).data.partition for name in routes]
    assert [p.part for p in parts] == [0, 1, 2, 3] and {p.parts for p in parts} == {4}


@pytest.mark.parametrize("recipe,message", [
    ([{"name": "s", "for_each": {"data.partition.part": [0, 1], "train.seed": [0]}}], "different lengths"),
    ([{"name": "s", "for_each": {"data.partition.part": 0}}], "non-empty lists"),
    ([{"name": "s"}, {"name": "r", "route": "s"}], "not an earlier stage with for_each"),
    ([{"name": "s", "for_each": {"data.partition.part": [0, 1]}}, {"name": "r", "route": "s", "set": {}}],
     "takes only name and route"),
])
def test_bad_fan_outs_and_route_stages_are_refused_by_name(recipe, message):
    with pytest.raises(ConfigError, match=message):
        plan_stages({**read_config_tree("msd_gmm"), "recipe": recipe})
