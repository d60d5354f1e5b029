"""SD's x4 upscaler behind the Teacher adapter (tiny StableDiffusionUpscalePipeline built offline): the low-resolution
image and its noise level as conditioning shared by both guidance branches, the teacher's sampler against the
pipeline's loop, and regression and DMD2 students that train, resume, export, reload with plain diffusers and
upscale an image in one step."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionUpscalePipeline
from PIL import Image

from stepdistill.config import load_config
from stepdistill.data.images import ImageFolderDataset
from stepdistill.pipelines import RECIPE_FILE
from stepdistill.teachers.loading import detect_kind, teacher_class
from stepdistill.teachers.tiny import build_tiny_pipeline, save_tiny_pipeline
from stepdistill.teachers.upscale import SDUpscaleTeacher
from stepdistill.training import Trainer

LOW = 8  # low-resolution side; the output is 4x: 32 px (latents 4 x 8 x 8)


def _low_res_folder(folder, n: int = 3):
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        Image.fromarray((torch.rand(LOW, LOW, 3, generator=g) * 255).to(torch.uint8).numpy()).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a photo of a cat {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def teacher():
    return SDUpscaleTeacher(build_tiny_pipeline("sd_upscale"))


def test_an_upscale_pipeline_is_an_image_conditioned_teacher(teacher):
    assert detect_kind(teacher.pipe) == "sd_upscale" and teacher_class("sd_upscale") is SDUpscaleTeacher
    assert teacher.image_conditioned and teacher.sample_shape == (4, LOW, LOW)
    assert teacher.pixel_size == 4 * LOW and teacher.condition_image_size == LOW
    assert teacher.schedule.prediction_type == "v_prediction" and teacher.pipeline_call_kwargs() == {"noise_level": 20}


def test_teacher_sampler_matches_the_upscale_pipeline(teacher, tmp_path):
    """The low-resolution image in [-1, 1] noised to level 20 by the pipeline's low_res_scheduler (the same draw:
    generator seeded 0), concatenated to the latents, its level the class label; CFG drops only the prompt."""
    images = ImageFolderDataset(_low_res_folder(tmp_path / "low"), LOW)
    cond = teacher.encode(["a photo of a cat"]).with_shared(teacher.image_fields((images[0]["image"][None] + 1) / 2))
    assert torch.equal(cond.fields["image"], cond.null["image"]) and cond.fields["class_labels"].tolist() == [20]
    noise = torch.randn(1, *teacher.sample_shape)
    ours = teacher.sample(noise, cond, num_steps=4, guidance=4.0)  # 4 divides T: DDIM steps to the trailing grid
    pipe = teacher.pipe
    scheduler = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)
    try:
        theirs = pipe(image=Image.open(images.files[0]), prompt="a photo of a cat", latents=noise.clone(),
                      num_inference_steps=4, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
                      output_type="latent").images
    finally:
        pipe.scheduler = scheduler
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_pipeline("sd_upscale", tmp_path_factory.mktemp("tiny") / "sd_upscale")


REGRESSION = ["objective.name=regression", "objective.pairs.num=4", "objective.pairs.steps=2",
              "objective.pairs.guidance=4.0", "objective.lr=1.0e-3"]
DMD2 = ["objective.name=dmd2", "objective.real_guidance=4.0", "objective.critic_updates=1",
        "objective.generator_lr=1.0e-4"]


@pytest.mark.parametrize("objective", [REGRESSION, DMD2], ids=["regression", "dmd2"])
def test_students_train_resume_export_and_upscale_in_one_step(folder, tmp_path, objective):
    low = _low_res_folder(tmp_path / "low")
    out = tmp_path / "run"

    def overrides(steps: int, extra=()):
        return ["teacher.kind=sd_upscale", f"teacher.path={folder}", "student.kind=copy", "student.timesteps=[999]",
                f"data.image_dir={low}", *objective, f"train.output_dir={out}", f"train.max_steps={steps}",
                "train.batch_size=2", "train.checkpoint_every=2", "train.report_to=none", "train.progress=false",
                "train.num_validation_samples=1", "train.mixed_precision='no'", *extra]

    Trainer(load_config(None, overrides(2))).train()
    trainer = Trainer(load_config(None, overrides(3, ["train.resume=latest"])))
    result = trainer.train()
    assert result.step == 3
    generator, source = trainer.generator_for_inference(), trainer.objective.source
    pipe = DiffusionPipeline.from_pretrained(str(result.final_dir))
    recipe = json.loads((result.final_dir / RECIPE_FILE).read_text())
    assert type(pipe) is StableDiffusionUpscalePipeline
    assert recipe["pipeline_kwargs"]["noise_level"] == 20 and recipe["num_inference_steps"] == 1
    noise = torch.randn(1, *generator.teacher.sample_shape)
    latents = pipe(image=Image.open(low / "1.png"), prompt=source.prompts[1], latents=noise.clone(),
                   generator=torch.Generator().manual_seed(0), output_type="latent",
                   **recipe["pipeline_kwargs"]).images
    torch.testing.assert_close(latents, generator.sample(noise, source.encode(torch.tensor([1]))), atol=1e-4,
                               rtol=1e-4)
    upscaled = pipe(image=Image.open(low / "1.png"), prompt=source.prompts[1], output_type="np",
                    **recipe["pipeline_kwargs"]).images
    assert upscaled.shape == (1, 4 * LOW, 4 * LOW, 3) and np.isfinite(upscaled).all()


def test_sample_upscales_a_given_image_and_refuses_none(teacher, tmp_path):
    from stepdistill.config import ConfigError, StudentConfig
    from stepdistill.export import export_student
    from stepdistill.sample import sample
    from stepdistill.students.build import build_student

    export = export_student(build_student(teacher, StudentConfig(timesteps=[999])), teacher, tmp_path / "export")
    low = _low_res_folder(tmp_path / "low") / "0.png"
    with pytest.raises(ConfigError, match="StableDiffusionUpscalePipeline.: give its input image"):
        sample(export, ["a photo of a cat"], num=1, seed=0, out=tmp_path / "none")
    record = sample(export, ["a photo of a cat", "a dog"], num=2, seed=0, out=tmp_path / "samples", image=low)
    assert record["images"] == 4
    assert Image.open(tmp_path / "samples" / "00-a-photo-of-a-cat-seed1.png").size == (4 * LOW, 4 * LOW)


@pytest.mark.parametrize("objective", [["objective.name=consistency", "objective.data=teacher",
                                        "objective.pairs.num=4", "objective.pairs.steps=2",
                                        "student.timesteps=[999,499]"],
                                       ["objective.name=ladd", "objective.pairs.num=4", "objective.pairs.steps=2"]],
                         ids=["consistency", "ladd"])
def test_consistency_and_ladd_take_the_image_condition(folder, tmp_path, objective):
    """Every objective that reads its conditions from the source gets the low-resolution image with the prompt (LADD's
    discriminator probes the teacher with fields of the conditioning's shapes)."""
    low = _low_res_folder(tmp_path / "low")
    trainer = Trainer(load_config(None, [
        "teacher.kind=sd_upscale", f"teacher.path={folder}", f"data.image_dir={low}", *objective,
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=0",
        "train.report_to=none", "train.progress=false", "train.num_validation_samples=1",
        "train.mixed_precision='no'"]))
    assert trainer.train().step == 2
    assert set(trainer.objective.source.encode(torch.tensor([0])).fields) == {"encoder_hidden_states", "image",
                                                                           "class_labels"}
