"""Every DMD2 preset, with tiny overrides, trains through the CLI on a tiny diffusers teacher and exports a
pipeline that plain diffusers loads and samples with the student's timesteps and guidance off."""
import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from stepdistill.cli import main
from stepdistill.pipelines import RECIPE_FILE
from stepdistill.teachers.tiny import save_tiny_pipeline

PRESETS = [
    ("configs/dmd2_sd15.yaml", "sd", [999]),
    ("configs/dmd2_sdxl_4step.yaml", "sdxl", [999, 749, 499, 249]),
    ("configs/dmd2_sdxl_1step.yaml", "sdxl", [399]),
    ("configs/dmd2_pixart.yaml", "pixart", [999]),
    ("configs/dmd2_flux.yaml", "flux", [1000.0, 904.5, 759.5, 512.8]),
]
TINY_SIZE = {"flux": ["data.resolution=16"]}  # presets that name their resolution: the tiny teachers' 16 px


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {k: save_tiny_pipeline(k, root / k) for k in ("sd", "sdxl", "pixart", "sd3", "flux")}


def tiny_overrides(folder, out, extra=()):
    return [f"teacher.path={folder}", f"train.output_dir={out}", "train.max_steps=3", "train.batch_size=2",
            "train.checkpoint_every=0", "train.report_to=none", "train.num_validation_samples=2",
            "train.progress=false", "train.mixed_precision='no'", "train.gradient_checkpointing=false",
            "objective.critic_updates=2", "objective.generator_lr=1e-4", "objective.critic_lr=1e-4", *extra]


def sample_export(folder, batch=1):
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    extra = {"use_resolution_binning": False} if "PixArt" in recipe["pipeline_class"] else {}
    if recipe["pipeline_class"] == "FluxPipeline":  # its default size is 128 latent pixels, not the VAE's
        extra = {"height": 16, "width": 16}
    out = pipe(["a photo of a cat"] * batch, output_type="latent", **recipe["pipeline_kwargs"], **extra).images
    return pipe, recipe, out


@pytest.mark.parametrize("preset,kind,timesteps", PRESETS)
def test_preset_trains_exports_and_samples_with_plain_diffusers(preset, kind, timesteps, tiny, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny[kind], out, TINY_SIZE.get(kind, []))
    assert main(["train", "--json", "--config", preset, *overrides]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3
    pipe, recipe, latents = sample_export(out / "final")
    # guidance off, or the embedded guidance a guidance-distilled teacher's student was trained at (Flux-dev)
    assert recipe["student_timesteps"] == timesteps and recipe["guidance_scale"] == (3.5 if kind == "flux" else 0.0)
    assert pipe.scheduler.timesteps.tolist() == pytest.approx(timesteps)
    assert torch.isfinite(latents).all() and latents.shape[0] == 1


def test_sd3_flow_teacher_trains_with_dmd2(tiny, tmp_path, capsys):
    """The flow-matching teacher goes through the same schedule module: velocity outputs, shifted timesteps."""
    out = tmp_path / "run"
    assert main(["train", "--config", "configs/dmd2_sd15.yaml",
                 *tiny_overrides(tiny["sd3"], out, ["teacher.kind=sd3", "teacher.path=" + str(tiny["sd3"])])]) == 0
    pipe, recipe, latents = sample_export(out / "final")
    assert recipe["prediction_type"] == "flow" and torch.isfinite(latents).all()


def test_gan_term_on_real_images_reaches_the_unet_bottleneck(tiny, tmp_path, capsys):
    """Real images from a folder are encoded once by the teacher's VAE (cached) and feed the GAN head, which
    sits on the fake-score UNet's mid-block."""
    images = tmp_path / "real"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny["sd"], out, ["objective.real_data=images", f"data.image_dir={images}",
                                                 "train.log_every=1",
                                                 "train.report_to=tensorboard"])
    assert main(["train", "--config", "configs/dmd2_sd15.yaml", *overrides]) == 0
    latents = out / "real_latents.safetensors"
    assert latents.is_file()
    from safetensors.torch import load_file

    assert load_file(str(latents))["latents"].shape == (4, 4, 8, 8)
    from stepdistill.config import load_config
    from stepdistill.objectives import build_objective

    obj = build_objective(load_config("configs/dmd2_sd15.yaml", overrides), "cpu")
    assert obj.critic.head is not None
    obj.prepare_data(out, "cpu")  # the cached latents of the first run are reused
    losses = obj.loss("critic", {"cond_index": torch.tensor([0, 1])}, 1)
    losses["loss"].backward()
    mid = obj.critic.fake_score.mid_block
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mid.parameters())
    assert "gan_d" in losses and torch.isfinite(losses["gan_d"])


def test_lora_generator_and_lora_critic_train_only_their_adapters(tiny, tmp_path):
    """DMD2's SDXL LoRA recipe: the generator is a LoRA; the fake score may share a frozen base via a LoRA."""
    from stepdistill.config import load_config
    from stepdistill.objectives import build_objective

    overrides = tiny_overrides(tiny["sdxl"], tmp_path / "run", ["student.kind=lora", "student.lora_rank=4",
                                                                 "objective.critic=lora",
                                                                 "objective.critic_lora_rank=4"])
    obj = build_objective(load_config("configs/dmd2_sdxl_4step.yaml", overrides), "cpu")
    for phase, module in (("generator", obj.generator.backbone), ("critic", obj.critic.fake_score)):
        for p in obj.parameters():
            p.grad = None
        obj.loss(phase, {"cond_index": torch.tensor([0, 1])}, 0)["loss"].backward()
        trained = {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert trained and all("lora_" in n for n in trained), phase
        assert all(not p.requires_grad for n, p in module.named_parameters() if "lora_" not in n)
