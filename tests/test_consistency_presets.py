"""Consistency distillation on tiny SD1.x / SDXL pipelines: the guidance embedding reaches the UNet, every preset
trains through the CLI (staged presets stage by stage), exports load with plain diffusers and sample with the
scheduler that matches training, LoRA students share one backbone with their teacher, and the EMA target
survives a resume bitwise."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from stepdistill.cli import main
from stepdistill.config import load_config
from stepdistill.export import export_student, load_mlp_student
from stepdistill.objectives import build_objective
from stepdistill.objectives.consistency import guidance_embedding
from stepdistill.pipelines import RECIPE_FILE, load_exported
from stepdistill.students import OdeGenerator, RenoiseGenerator
from stepdistill.students.lora import BaseNetwork
from stepdistill.teachers.tiny import save_tiny_pipeline
from stepdistill.training import Trainer

PROMPT = "a photo of a cat"
ROOT = Path(__file__).parents[1]
PIPELINES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {k: save_tiny_pipeline(k, root / k) for k in ("sd", "sdxl")}


def overrides(folder, out, *extra):
    return [f"teacher.path={folder}", f"train.output_dir={out}", "train.max_steps=2", "train.batch_size=2",
            "train.checkpoint_every=0", "train.validate_every=0", "train.report_to=none",
            "train.num_validation_samples=2", "train.progress=false", "train.mixed_precision='no'",
            "train.gradient_checkpointing=false", "objective.pairs.num=4", "objective.pairs.steps=2",
            "objective.lr=1e-3", "student.lora_rank=4", "student.lora_alpha=4.0", *extra]


def perturb_(net, scale=0.05):
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


# ------------------------------------------------------------------ gap 1: timestep_cond reaches the UNet
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_guidance_embedding_reaches_the_unet(kind, tiny, tmp_path):
    cfg = load_config(ROOT / "configs/lcm_sd15.yaml", overrides(tiny[kind], tmp_path, f"teacher.kind={kind}"))
    objective = build_objective(cfg, "cpu")
    teacher, net = objective.teacher, objective.generator.backbone
    assert net.config.time_cond_proj_dim == 256
    x, t = torch.randn(2, *teacher.sample_shape), torch.tensor([999, 499])
    fields = dict(teacher.encode([PROMPT] * 2).fields)
    outs = []
    for w in (2.0, 9.0):
        emb = guidance_embedding(torch.full((2,), w), 256)
        outs.append(teacher.call(net, x, t, {**fields, "timestep_cond": emb}))
        added = {"added_cond_kwargs": {"text_embeds": fields["text_embeds"], "time_ids": fields["time_ids"]}} \
            if kind == "sdxl" else {}
        direct = net(x, t, encoder_hidden_states=fields["encoder_hidden_states"], timestep_cond=emb, **added).sample
        torch.testing.assert_close(outs[-1], direct)
    assert (outs[0] - outs[1]).abs().max() > 1e-4  # w changes the output: the embedding is used


# ------------------------------------------------------------------ gap 2: presets through the CLI
PRESETS = [  # preset, tiny kind, extra overrides, [(stage folder or "", scheduler, timesteps)]
    ("lcm_sd15", "sd", [], [("", LCMScheduler, [999, 759, 499, 259])]),
    ("lcm_lora_sdxl", "sdxl", [], [("", LCMScheduler, [999, 759, 499, 259])]),
    ("mlcm_sdxl", "sdxl", ["train.max_steps=1"],
     [("seg8", DDIMScheduler, [999, 874, 749, 624, 499, 374, 249, 124]),
      ("seg4", DDIMScheduler, [999, 749, 499, 249])]),
    ("tscd_sd15", "sd", ["train.max_steps=1"],
     [("seg8", EulerDiscreteScheduler, [999, 859, 739, 619, 499, 359, 239, 119]),
      ("seg4", EulerDiscreteScheduler, [999, 739, 499, 239]),
      ("seg2", DDIMScheduler, [999, 499]),  # on the trailing grid
      ("seg1", LCMScheduler, [999])]),
]


@pytest.mark.parametrize("preset,kind,extra,exports", PRESETS, ids=[p[0] for p in PRESETS])
def test_preset_trains_through_the_cli_and_exports_load_with_plain_diffusers(preset, kind, extra, exports, tiny,
                                                                            tmp_path, capsys):
    out = tmp_path / "run"
    extra = [*extra, f"objective.pairs.dir={out / 'pairs'}"] if extra else extra
    assert main(["train", "--json", "--config", preset, *overrides(tiny[kind], out, *extra)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [s["steps"] for s in summary.get("stages", [summary])] == [1 if extra else 2] * len(exports)
    for stage, scheduler_class, timesteps in exports:
        folder = out / stage / "final"
        pipe = PIPELINES[kind].from_pretrained(str(folder))
        recipe = json.loads((folder / RECIPE_FILE).read_text())
        assert isinstance(pipe.scheduler, scheduler_class) and recipe["student_timesteps"] == timesteps
        noise = torch.randn(1, pipe.unet.config.in_channels, 8, 8)
        torch.manual_seed(0)
        merged = pipe(PROMPT, latents=noise.clone(), output_type="latent", **recipe["pipeline_kwargs"]).images
        assert pipe.scheduler.timesteps.tolist() == timesteps and torch.isfinite(merged).all()
        if recipe["lora"]:  # the LoRA on the teacher's own pipeline gives the merged student
            base = PIPELINES[kind].from_pretrained(str(tiny[kind]))
            base.scheduler = pipe.scheduler
            base.load_lora_weights(str(folder / recipe["lora"]))
            torch.manual_seed(0)
            with_lora = base(PROMPT, latents=noise.clone(), output_type="latent", **recipe["pipeline_kwargs"]).images
            torch.testing.assert_close(with_lora, merged, atol=1e-4, rtol=1e-4)
        else:
            assert pipe.unet.config.time_cond_proj_dim == 256 and recipe["guidance_scale"] == 11.0  # w = 10 + 1


# ------------------------------------------------------------------ gap 2: LoRA teacher = base, one backbone
def test_lora_student_teacher_is_its_base_with_adapters_disabled(tiny, tmp_path):
    cfg = load_config(ROOT / "configs/lcm_lora_sdxl.yaml", overrides(tiny["sdxl"], tmp_path))
    objective = build_objective(cfg, "cpu")
    teacher, student = objective.teacher, objective.generator.backbone
    assert isinstance(teacher.backbone, BaseNetwork) and teacher.backbone.net is student
    assert teacher.pipe.unet is teacher.backbone  # the teacher's own UNet copy is gone: one backbone in memory
    unets = {id(m) for c in teacher.pipe.components.values() if isinstance(c, torch.nn.Module)
             for m in c.modules() if type(m).__name__ == "UNet2DConditionModel"}
    assert unets == {id(student)}
    perturb_(student)  # LoRA weights now change the student
    original = DiffusionPipeline.from_pretrained(str(tiny["sdxl"])).unet
    x, t = torch.randn(2, *teacher.sample_shape), torch.tensor([999, 499])
    cond = teacher.encode([PROMPT] * 2)
    fields = dict(cond.fields)
    added = {"text_embeds": fields["text_embeds"], "time_ids": fields["time_ids"]}
    reference = original(x, t, encoder_hidden_states=fields["encoder_hidden_states"], added_cond_kwargs=added).sample
    torch.testing.assert_close(teacher.model_output(x, t, fields), reference, atol=1e-5, rtol=1e-5)
    assert (teacher.call(student, x, t, fields) - reference).abs().max() > 1e-3
    x_s = objective.solver_step(x, t, t - 20, cond, torch.full((2,), 4.0))
    pred = teacher.predict(x, t, cond, 5.0)
    torch.testing.assert_close(x_s, teacher.schedule.ddim_step(pred.x0, pred.eps, t - 20))


# ------------------------------------------------------------------ gap 3: exports sample as the student does
@pytest.mark.parametrize("kind,segments,extra,scheduler_class", [
    ("sd", 4, ["objective.num_ddim_timesteps=50"], EulerDiscreteScheduler),  # tops [999, 739, 499, 239]
    ("sdxl", 4, ["objective.num_ddim_timesteps=40"], DDIMScheduler),  # tops = DDIM trailing [999, 749, 499, 249]
])
def test_segmented_lora_export_equals_the_segment_sampler(kind, segments, extra, scheduler_class, tiny, tmp_path):
    cfg = load_config(ROOT / "configs/tscd_sd15.yaml",
                      overrides(tiny[kind], tmp_path, "recipe=[]", f"teacher.kind={kind}",
                                f"objective.num_segments={segments}", *extra))
    generator = build_objective(cfg, "cpu").generator
    assert isinstance(generator, OdeGenerator)
    perturb_(generator.backbone)
    folder = export_student(generator, generator.teacher, tmp_path / "export")
    pipe, recipe = load_exported(folder)
    assert isinstance(pipe.scheduler, scheduler_class) and recipe["guidance_scale"] == 0.0
    noise = torch.randn(2, *generator.teacher.sample_shape)
    expected = generator.sample(noise, generator.teacher.encode([PROMPT] * 2))
    images = pipe([PROMPT] * 2, latents=noise.clone(), output_type="latent", **recipe["pipeline_kwargs"]).images
    assert pipe.scheduler.timesteps.tolist() == [int(t) for t in generator.timesteps]
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=1e-4)
    renoising = RenoiseGenerator(generator.backbone, generator.teacher, generator.timesteps, generator.schedule,
                                 generator.prediction_type)
    renoised = renoising.sample(noise, generator.teacher.encode([PROMPT] * 2))
    assert (renoised - expected).abs().max() > 1e-3  # LCM-style re-noising would be a different sampler


def test_lcm_export_with_guidance_embedding_equals_the_student(tiny, tmp_path):
    cfg = load_config(ROOT / "configs/lcm_sd15.yaml", overrides(tiny["sd"], tmp_path))
    generator = build_objective(cfg, "cpu").generator
    perturb_(generator.backbone)
    pipe, recipe = load_exported(export_student(generator, generator.teacher, tmp_path / "export"))
    assert isinstance(pipe.scheduler, LCMScheduler) and recipe["guidance_scale"] == generator.w + 1
    noise = torch.randn(2, *generator.teacher.sample_shape)
    torch.manual_seed(3)
    images = pipe([PROMPT] * 2, latents=noise.clone(), output_type="latent", **recipe["pipeline_kwargs"]).images
    torch.manual_seed(3)
    expected = generator.sample(noise, generator.teacher.encode([PROMPT] * 2))
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=1e-4)
    unguided = copy.copy(generator)
    unguided.w = 0.0
    torch.manual_seed(3)
    assert (unguided.sample(noise, generator.teacher.encode([PROMPT] * 2)) - expected).abs().max() > 1e-4


GMM_CONFIG = ROOT / "configs/consistency_gmm.yaml"


def gmm_config(out, *extra):
    return load_config(GMM_CONFIG, [f"train.output_dir={out}", "train.overwrite=true", "train.progress=false",
                                    "train.batch_size=32", "train.log_every=100", "train.lr_scheduler=constant",
                                    *extra])


def test_mcd_mlp_export_reloads_with_its_segment_sampler(tmp_path):
    trainer = Trainer(gmm_config(tmp_path, "objective.num_segments=4", "train.max_steps=3"))
    result = trainer.train()
    generator = trainer.generator_for_inference()
    reloaded = load_mlp_student(result.final_dir, generator.teacher)
    assert isinstance(reloaded, OdeGenerator) and reloaded.timesteps == [999, 739, 499, 239]
    noise, cond = torch.randn(64, 2), generator.teacher.encode(torch.zeros(64))
    torch.testing.assert_close(reloaded.sample(noise, cond), generator.sample(noise, cond))


# ------------------------------------------------------------------ gap 4: the EMA target survives a resume
def test_ema_target_resumes_bitwise(tmp_path):
    straight = Trainer(gmm_config(tmp_path / "a", "train.max_steps=6", "train.checkpoint_every=3"))
    straight.train()
    first = Trainer(gmm_config(tmp_path / "b", "train.max_steps=3", "train.checkpoint_every=3"))
    first.train()
    resumed = Trainer(load_config(GMM_CONFIG, [
        f"train.output_dir={tmp_path / 'b'}", "train.progress=false", "train.batch_size=32", "train.log_every=100",
        "train.lr_scheduler=constant", "train.max_steps=6", "train.checkpoint_every=3", "train.resume=latest"]))
    resumed.train()
    a, b = straight.objective.target_backbone.state_dict(), resumed.objective.target_backbone.state_dict()
    online = resumed.objective.generator.backbone.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(b[k], online[k]) for k in b)  # the target lags the online net: it was restored


def test_guidance_embedding_is_added_to_a_unet_built_in_memory():
    """A UNet built in memory records its default keys in `_use_default_values`; the embedding must still be
    added (from_config would otherwise keep time_cond_proj_dim=None)."""
    from stepdistill.objectives.consistency import with_guidance_embedding
    from stepdistill.teachers.tiny import build_tiny_pipeline

    unet = build_tiny_pipeline("sd").unet
    assert "time_cond_proj_dim" in unet.config.get("_use_default_values", [])
    assert with_guidance_embedding(unet, 16).config.time_cond_proj_dim == 16
