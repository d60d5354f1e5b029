"""Exports and teachers that never lose work, and exports whose first diffusers call works, through the command line
as a user types it: `export --out` refuses an existing non-empty folder (with --overwrite the old one is moved
aside, kept whole) and any folder inside a run's checkpoints; `teacher` never writes into the installed package;
`DiffusionPipeline.from_pretrained(export)(prompt)` with no other argument returns an image for every export
product; the model card names no local path and carries base_model, license and metrics."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_utils import DIGITS_TEACHER, REPO, assert_fails, cli_env, run_cli
from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard
from reliability_utils import tiny_tree, write_config

from stepdistill.cli import main
from stepdistill.config import StudentConfig, TeacherConfig
from stepdistill.data.partition import EmbeddingClusters
from stepdistill.export import export_student
from stepdistill.export.card import add_card_metrics, run_metrics, write_model_card
from stepdistill.export.routed import export_routed
from stepdistill.objectives.consistency import GuidanceEmbeddedGenerator, with_guidance_embedding
from stepdistill.pipelines import RECIPE_FILE, load_exported
from stepdistill.schedules import NoiseSchedule
from stepdistill.students import FlowGenerator, OdeGenerator, build_student
from stepdistill.students.build import build_backbone
from stepdistill.students.signal import SignalGenerator
from stepdistill.teachers import load_teacher
from stepdistill.teachers.tiny import save_tiny_pipeline
from stepdistill.training.checkpoint import verify_checkpoint

PROMPT = "a handwritten digit seven"


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def gmm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gmm")
    config = write_config(tiny_tree(root / "run", max_steps=4, checkpoint_every=2), root / "run.yaml")
    assert main(["train", "--config", str(config)]) == 0
    return root / "run"


def test_export_into_an_existing_folder_is_refused_then_moved_aside_on_request(gmm_run, tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused = run_cli("export", gmm_run, "--out", out, cwd=tmp_path)
    assert_fails(refused, 2, f"--out {out} is not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    assert main(["export", str(gmm_run), "--out", str(out), "--overwrite", "--json"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("export.replaced-")]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "mine"  # kept whole, not deleted
    captured = capsys.readouterr()
    assert json.loads(captured.out)["previous_export"] == str(aside[0])
    assert (out / "student.json").is_file() and not (out / "notes.txt").exists()
    assert f"moved the previous contents of {out} to {aside[0]}" in captured.err


def test_export_inside_a_runs_checkpoints_is_refused_and_the_checkpoint_survives(gmm_run, tmp_path, capsys):
    ckpt = gmm_run / "checkpoints" / "checkpoint-4"
    before = tree_digest(ckpt)
    refused = run_cli("export", ckpt, "--out", ckpt, "--overwrite", cwd=tmp_path)
    assert_fails(refused, 2, f"--out {ckpt} is inside the checkpoints of the run {gmm_run}",
                 f"--out {gmm_run / 'export-checkpoint-4'}")
    beside = gmm_run / "checkpoints" / "new-export"  # a new folder among the checkpoints, from the run folder
    assert main(["export", str(gmm_run), "--out", str(beside)]) == 2
    assert f"--out {beside} is inside the checkpoints of the run {gmm_run}" in capsys.readouterr().err
    assert tree_digest(ckpt) == before and verify_checkpoint(ckpt) is None
    assert sorted(p.name for p in (gmm_run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_teacher_command_writes_outside_the_package_and_refuses_the_shipped_asset(tmp_path, capsys):
    shipped = tree_digest(DIGITS_TEACHER)
    inside = REPO / "stepdistill" / "assets" / "digits_teacher"
    assert main(["teacher", "digits", "--out", str(inside), "--unet-steps", "1", "--vae-steps", "1"]) == 2
    assert f"--out {inside} is inside the installed package" in capsys.readouterr().err

    done = run_cli("teacher", "digits", "--unet-steps", "1", "--vae-steps", "1", "--eval-per-digit", "1",
                   "--reference-per-digit", "1", "--device", "cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    written = tmp_path / "runs" / "teachers" / "digits"
    assert (written / "model_index.json").is_file() and (written / "training.json").is_file()
    assert tree_digest(DIGITS_TEACHER) == shipped  # the shipped teacher every demo reads is untouched


# ---------------------------------------------------------------------------------------------- default call
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    folder = save_tiny_pipeline("sd", root / "sd")
    return folder, load_teacher(TeacherConfig(kind="auto", path=str(folder)), "cpu")


def _backbone(teacher):
    return build_backbone(teacher, StudentConfig())


# every kind of student a diffusers teacher exports, built as its objective builds it; the one-step student at
# t=999 (DMD2, regression) is the product of the command-line test below
PRODUCTS = {
    "one-step at t=399 (DMD2's SDXL trick)": lambda t: build_student(t, StudentConfig(timesteps=[399])),
    "few-step re-noising": lambda t: build_student(t, StudentConfig(timesteps=[999, 749, 499, 249])),
    "consistency (LCM w embedding)": lambda t: GuidanceEmbeddedGenerator(
        with_guidance_embedding(_backbone(t), 32), t, [999, 499], t.schedule, None, 3.0),
    "multistep consistency (MCD segments)": lambda t: OdeGenerator(_backbone(t), t, [999, 659, 319], t.schedule),
    "BOOT signal ODE": lambda t: SignalGenerator(_backbone(t), t, [0.0], t.schedule, "sample"),
    "multistep flow of a VP teacher (reflow, InstaFlow)": lambda t: FlowGenerator(
        _backbone(t), t, 3, NoiseSchedule.flow(1.0), guidance=1.5),
    "one-step flow of a VP teacher (InstaFlow, SlimFlow)": lambda t: OdeGenerator(
        _backbone(t), t, [1000.0], NoiseSchedule.flow(1.0), "flow"),
}


@pytest.mark.parametrize("product", sorted(PRODUCTS))
def test_the_first_diffusers_call_works_on_every_export_product(product, tiny, tmp_path):
    teacher = tiny[1]
    generator = PRODUCTS[product](teacher)
    folder = export_student(generator, teacher, tmp_path / "export")
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT).images[0]
    assert image.size == (16, 16)
    assert "`pipe(prompt)` alone runs the pipeline's defaults" in (folder / "README.md").read_text()
    # the recipe's own arguments, in plain diffusers, are the student's sampler (flow ones need no patch)
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    noise = torch.randn(1, *teacher.sample_shape)
    torch.manual_seed(3)
    latents = pipe(PROMPT, latents=noise.clone(), output_type="latent", **recipe["pipeline_kwargs"]).images
    torch.manual_seed(3)
    torch.testing.assert_close(latents, generator.sample(noise, teacher.encode([PROMPT])), atol=1e-4, rtol=1e-4)


def test_routed_students_are_each_a_folder_whose_first_call_works(tiny, tmp_path):
    teacher = tiny[1]
    students = [export_student(build_student(teacher, StudentConfig(timesteps=[999])), teacher, tmp_path / f"s{k}")
                for k in range(2)]
    routed = export_routed(students, EmbeddingClusters.fit(torch.randn(4, 8), 2, seed=0), tmp_path / "routed")
    pipe = DiffusionPipeline.from_pretrained(str(routed / "students" / "1"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe(PROMPT).images[0].size == (16, 16)


def test_the_default_call_of_a_cli_export_works_in_plain_diffusers(tiny, tmp_path):
    """A one-step student trained and exported by the command line, then exactly what a diffusers user types, in a
    fresh Python that imports nothing of stepdistill."""
    run = tmp_path / "run"
    overrides = ["teacher.kind=auto", f"teacher.path={tiny[0]}", "student.kind=copy", "student.timesteps=[999]",
                 "objective.name=regression", "objective.pairs.num=4", "objective.pairs.steps=2",
                 "objective.pairs.guidance=2.0", f"train.output_dir={run}", "train.max_steps=1", "train.batch_size=2",
                 "train.checkpoint_every=1", "train.report_to=none", "train.num_validation_samples=1",
                 "train.progress=false", "train.mixed_precision='no'"]
    assert main(["train", *overrides]) == 0
    out = tmp_path / "export"
    assert main(["export", str(run / "checkpoints" / "checkpoint-1"), "--out", str(out)]) == 0
    code = (f"from diffusers import DiffusionPipeline\nimage = DiffusionPipeline.from_pretrained({str(out)!r})"
            f"({PROMPT!r}).images[0]\nprint(image.size)")
    env = {k: v for k, v in cli_env().items() if k != "PYTHONPATH"}
    user = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
                          timeout=300)
    assert user.returncode == 0 and user.stdout.strip() == "(16, 16)", user.stderr[-2000:]
    card = (out / "README.md").read_text()
    assert str(tiny[0]) not in card and "base_model:" not in card  # a local teacher: its folder name, no path
    assert "a local teacher folder `sd`" in card and "License: unknown" in card


# ---------------------------------------------------------------------------------------------- model card
def _recipe(base_model: str, license_: str | None) -> dict:
    return {"product": "diffusers", "pipeline_class": "StableDiffusionPipeline", "teacher": "sd:x",
            "base_model": base_model, "base_model_on_hub": True, "license": license_, "objective": "dmd2", "student_timesteps": [999],
            "prediction_type": "epsilon", "sampling": {"any_num_steps": False}, "scheduler": "LCMScheduler",
            "num_inference_steps": 1, "pipeline_kwargs": {"num_inference_steps": 1, "guidance_scale": 0.0},
            "guidance_scale": 0.0, "lora": None}


def test_model_card_names_a_hub_base_model_its_license_and_the_runs_metrics(tmp_path):
    hub = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    card = ModelCard.load(write_model_card(tmp_path, _recipe(hub, "creativeml-openrail-m"), "a cat",
                                           {"steps": 10}, ({"fid": 12.5}, "1000 samples")))
    assert card.data.base_model == hub and card.data.license == "creativeml-openrail-m"
    assert card.data.to_dict()["metrics"] == {"fid": 12.5} and "- fid: 12.5" in card.text
    # metrics measured after the export (the demo's): added to the card, the rest kept
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"steps": 10, "metrics": {"student": {"fid": 3.0}},
                                                               "protocol": {"seed": 0}}))
    assert run_metrics(tmp_path / "run", 9) is None  # measured on another step: not this student's
    metrics, protocol = run_metrics(tmp_path / "run", 10)
    card = ModelCard.load(add_card_metrics(tmp_path, _recipe(hub, None), metrics, protocol))
    assert "| student | 3 |" in card.text and card.data.example_prompt == "a cat"
    assert card.data.training == {"steps": 10} and card.data.license is None and "License: unknown" in card.text


def test_export_of_the_shipped_digits_teacher_has_a_portable_card_with_the_projects_license(tmp_path):
    teacher = load_teacher(TeacherConfig(kind="auto", path=str(DIGITS_TEACHER)), "cpu")
    folder = export_student(build_student(teacher, StudentConfig(timesteps=[999])), teacher, tmp_path / "export")
    card = ModelCard.load(folder / "README.md")
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    assert recipe["base_model"] == "digits_teacher" and card.data.license == "apache-2.0"
    assert card.data.base_model is None and str(REPO) not in card.content
    _, loaded = load_exported(folder)
    assert loaded == recipe
