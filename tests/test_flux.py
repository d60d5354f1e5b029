"""Flux.1 behind the Teacher adapter (tiny FluxPipeline built offline): the resolution-dependent shift against
diffusers' scheduler, the teacher's sampler against FluxPipeline, the embedded guidance as one call, packed latents
for any backbone of the architecture, gradient checkpointing and bf16 autocast on the backbone, train / resume /
export / reload with plain diffusers; and every published architecture built on the meta device."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from stepdistill.config import StudentConfig, load_config
from stepdistill.export import export_student
from stepdistill.perf.arch import REAL_MODELS, arch_config, build_teacher, model_for
from stepdistill.perf.memory import count_saved
from stepdistill.pipelines import RECIPE_FILE
from stepdistill.schedules import NoiseSchedule, resolution_shift
from stepdistill.students.build import build_backbone, build_student
from stepdistill.teachers.flux import FluxTeacher
from stepdistill.teachers.loading import detect_kind, teacher_class
from stepdistill.teachers.tiny import TINY_KINDS, build_tiny_pipeline, save_tiny_pipeline
from stepdistill.training import Trainer

PROMPT = "a photo of a cat"
FLUX_SCHEDULER = arch_config("flux")["components"]["scheduler"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_pipeline("flux", tmp_path_factory.mktemp("tiny") / "flux")


@pytest.fixture(scope="module")
def teacher():
    return FluxTeacher(build_tiny_pipeline("flux"))


def packed(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


# ---------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("image_seq_len,steps", [(16, 3), (1024, 4), (4096, 28), (6400, 1)])
def test_dynamic_shift_grid_matches_diffusers_flow_match_scheduler(image_seq_len, steps):
    """FluxPipeline's sigmas linspace(1, 1/n, n) under the time shift at mu(image_seq_len) are our flow grid
    at the fixed shift exp(mu)."""
    config = {k: v for k, v in FLUX_SCHEDULER.items() if k != "_class_name"}
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(image_seq_len, config["base_image_seq_len"], config["max_image_seq_len"],
                         config["base_shift"], config["max_shift"])
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = NoiseSchedule.from_scheduler_config(FLUX_SCHEDULER, image_seq_len, "flux")
    assert ours.shift == pytest.approx(math.exp(mu), rel=1e-12)
    torch.testing.assert_close(torch.tensor(ours.inference_timesteps(steps)), scheduler.timesteps, atol=1e-3, rtol=0)


def test_linear_time_shift_and_the_missing_resolution_error():
    assert resolution_shift(4096, time_shift_type="linear") == pytest.approx(1.15)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=resolution_shift(1024, time_shift_type="linear"))
    ours = NoiseSchedule.from_scheduler_config(scheduler.config, 1024, "flux")
    torch.testing.assert_close(torch.tensor(ours.inference_timesteps(4)), scheduler.timesteps, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="pass image_seq_len"):
        NoiseSchedule.from_scheduler_config(FLUX_SCHEDULER)


def test_data_resolution_rebuilds_the_shift(teacher):
    tall = FluxTeacher(build_tiny_pipeline("flux"))
    assert tall.sample_shape == (4, 8, 8) and tall.resolution_multiple == 4
    tall.set_resolution(32)
    assert tall.sample_shape == (4, 16, 16) and tall.image_seq_len() == 64
    assert tall.schedule.shift == pytest.approx(resolution_shift(64)) and tall.schedule.shift != teacher.schedule.shift
    with pytest.raises(ValueError, match="multiple of 4"):
        tall.set_resolution(18)


# ---------------------------------------------------------------------------------------------- adapter
def test_teacher_sampler_matches_the_flux_pipeline(teacher):
    """Packing, position ids, the shift at this resolution, the timestep fraction and the embedded guidance all
    as FluxPipeline feeds them: our flow Euler sampler equals the pipeline's loop on the same noise."""
    noise = torch.randn(1, *teacher.sample_shape)
    ours = teacher.sample(noise, teacher.encode([PROMPT]), num_steps=3, guidance=2.5)
    theirs = teacher.pipe(PROMPT, latents=packed(noise.clone()), num_inference_steps=3, guidance_scale=2.5,
                          height=16, width=16, output_type="latent").images
    torch.testing.assert_close(packed(ours), theirs, atol=1e-5, rtol=1e-5)


def test_embedded_guidance_is_one_call_without_a_null_branch(teacher):
    cond = teacher.encode(["a cat", "a lighthouse"])
    assert cond.fields["guidance"].tolist() == [3.5, 3.5] == cond.null["guidance"].tolist()
    x, t = torch.randn(2, *teacher.sample_shape), torch.tensor([999.0, 300.0])
    calls = []
    hook = teacher.backbone.register_forward_hook(lambda m, i, kw, o: calls.append(kw["hidden_states"].shape[0]),
                                                  with_kwargs=True)
    try:
        guided = teacher.guided_output(x, t, cond, 5.0)
    finally:
        hook.remove()
    assert calls == [2]  # one call on the batch itself, no [null; cond] doubling
    fields = {**cond.fields, "guidance": torch.full((2,), 5.0)}
    torch.testing.assert_close(guided, teacher.model_output(x, t, fields), atol=0, rtol=0)
    assert (guided - teacher.model_output(x, t, cond.fields)).abs().max() > 1e-4  # the embedding matters
    per_sample = teacher.guided_output(x, t, cond, torch.tensor([2.0, 5.0]))
    alone = teacher.guided_output(x[:1], t[:1], cond.index(slice(0, 1)), 2.0)
    torch.testing.assert_close(per_sample[:1], alone, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(per_sample[1:], guided[1:], atol=1e-6, rtol=1e-5)


def test_schnell_without_guidance_embedding_takes_classifier_free_guidance():
    pipe = build_tiny_pipeline("flux")
    pipe.transformer = FluxTransformer2DModel.from_config({**pipe.transformer.config, "guidance_embeds": False})
    schnell = FluxTeacher(pipe)
    assert schnell.embedded_guidance is None
    cond = schnell.encode(["a cat"])
    assert "guidance" not in cond.fields
    x, t = torch.randn(1, *schnell.sample_shape), torch.tensor([700.0])
    cond_out, uncond_out = schnell.model_output(x, t, cond.fields), schnell.model_output(x, t, cond.null)
    torch.testing.assert_close(schnell.guided_output(x, t, cond, 3.0), uncond_out + 3.0 * (cond_out - uncond_out),
                               atol=1e-5, rtol=1e-4)


def test_a_student_backbone_runs_through_the_same_packing(teacher):
    net = teacher.build_backbone()
    cond, x, t = teacher.encode([PROMPT]), torch.randn(1, *teacher.sample_shape), torch.tensor([640.0])
    torch.testing.assert_close(teacher.call(net, x, t, cond.fields), teacher.model_output(x, t, cond.fields))
    with torch.no_grad():
        net.proj_out.bias.add_(1.0)  # a bias on the packed channels moves every unpacked latent pixel
    moved = teacher.call(net, x, t, cond.fields) - teacher.model_output(x, t, cond.fields)
    torch.testing.assert_close(moved, torch.ones_like(moved), atol=1e-5, rtol=0)


def test_gradient_checkpointing_and_bf16_autocast_on_the_flux_backbone(teacher):
    """CPU bf16 autocast runs the transformer's linears in bf16 with fp32 weights and gradients; checkpointing
    keeps a fraction of the activations for backward (blocks are recomputed) and gives the same gradients."""
    cond = teacher.encode([PROMPT, "a dog"])
    x, t = torch.randn(2, *teacher.sample_shape), torch.tensor([900.0, 200.0])

    def grads(net, checkpointing: bool, autocast: bool):
        if checkpointing:
            net.enable_gradient_checkpointing()
        else:
            net.disable_gradient_checkpointing()
        net.zero_grad(set_to_none=True)
        dtypes = []
        hook = net.proj_out.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        with count_saved([net]) as saved, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = teacher.call(net, x, t, cond.fields).square().mean()
        hook.remove()
        loss.backward()
        return {n: p.grad.clone() for n, p in net.named_parameters()}, sum(saved.values()), dtypes[0], loss

    net = teacher.build_backbone().train()
    plain, _, dtype, _ = grads(net, checkpointing=False, autocast=False)
    assert dtype == torch.float32
    mixed, saved, dtype, loss = grads(net, checkpointing=False, autocast=True)
    assert dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in mixed.values())
    norm = lambda gs: torch.cat([g.flatten() for g in gs.values()]).norm()
    assert abs(norm(mixed) / norm(plain) - 1) < 0.05  # bf16 matmuls, the same gradient to bf16 precision
    checkpointed, saved_checkpointed, _, _ = grads(net, checkpointing=True, autocast=True)
    assert saved_checkpointed < saved / 4
    for name, g in mixed.items():
        torch.testing.assert_close(checkpointed[name], g, atol=1e-6, rtol=1e-5)


def test_lora_student_of_a_bf16_teacher_keeps_its_frozen_base_in_bf16():
    """A LoRA student's base is frozen: it stays in the teacher's dtype (half the bytes of an fp32 copy; the
    planner's dmd2_flux / lcm_lora_flux numbers rest on it), the adapters train in fp32 and get the gradient."""
    pipe = build_tiny_pipeline("flux").to(torch.bfloat16)
    bf16 = FluxTeacher(pipe)
    net = build_backbone(bf16, StudentConfig(kind="lora", lora_rank=4, lora_alpha=4.0))
    frozen = {p.dtype for p in net.parameters() if not p.requires_grad}
    trained = [p for p in net.parameters() if p.requires_grad]
    assert frozen == {torch.bfloat16} and trained and {p.dtype for p in trained} == {torch.float32}
    cond, x = bf16.encode([PROMPT]), torch.randn(1, *bf16.sample_shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16.call(net, x, torch.tensor([500.0]), cond.fields).square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)
    assert any(p.grad.abs().sum() > 0 for p in trained)


# ---------------------------------------------------------------------------------------------- end to end
def _overrides(folder, out, max_steps, extra=()):
    return ["teacher.kind=flux", f"teacher.path={folder}", "student.kind=copy", "student.timesteps=[1000.0]",
            "objective.name=regression", "objective.pairs.num=4", "objective.pairs.steps=2",
            "objective.pairs.guidance=3.5", "objective.lr=1.0e-3", f"train.output_dir={out}",
            f"train.max_steps={max_steps}", "train.batch_size=2", "train.checkpoint_every=2", "train.report_to=none",
            "train.num_validation_samples=1", "train.progress=false", "train.mixed_precision='no'",
            "train.gradient_checkpointing=true", *extra]


def test_train_resume_export_and_reload_with_plain_diffusers(folder, tmp_path):
    out = tmp_path / "run"
    first = Trainer(load_config(None, _overrides(folder, out, 2))).train()
    assert first.step == 2 and (out / "checkpoints" / "checkpoint-2").is_dir()
    trainer = Trainer(load_config(None, _overrides(folder, out, 3, ["train.resume=latest"])))
    result = trainer.train()
    assert result.step == 3 and {int(s["step"]) for s in trainer.optimizers["generator"].state.values()} == {3}

    generator = trainer.generator_for_inference()
    teacher = generator.teacher
    assert any(not torch.equal(p, q) for p, q in zip(generator.backbone.parameters(), teacher.backbone.parameters()))
    pipe = DiffusionPipeline.from_pretrained(str(result.final_dir))
    recipe = json.loads((result.final_dir / RECIPE_FILE).read_text())
    assert type(pipe) is FluxPipeline and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    # the student was trained at the embedded guidance its conditioning carries; the export passes the same
    assert recipe["pipeline_kwargs"] == {"sigmas": [1.0], "guidance_scale": 3.5}
    noise = torch.randn(2, *teacher.sample_shape)
    images = pipe([PROMPT] * 2, latents=packed(noise.clone()), height=16, width=16, output_type="latent",
                  **recipe["pipeline_kwargs"]).images
    assert pipe.scheduler.timesteps.tolist() == [1000.0]
    expected = generator.sample(noise, teacher.encode([PROMPT] * 2))
    torch.testing.assert_close(images, packed(expected), atol=1e-4, rtol=1e-4)


@pytest.mark.fullsize
def test_the_default_call_of_a_flux_export(teacher, tmp_path):
    """`pipe(prompt)` with no other argument: FluxPipeline's own defaults, 1024 px worth of latents (128 x 128,
    whatever the VAE: 256 px on the tiny one) and 28 sigmas, which the exported scheduler steps through at the
    embedded guidance 3.5. About a minute of CPU on the tiny pipeline (4096 tokens a step), hence -m fullsize."""
    folder = export_student(build_student(teacher, StudentConfig(timesteps=[1000.0])), teacher, tmp_path / "export")
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT).images[0]
    assert type(pipe) is FluxPipeline and image.size == (256, 256) and len(pipe.scheduler.timesteps) == 28
    assert np.asarray(image).std() > 0


# ---------------------------------------------------------------------------------------------- real sizes
PUBLISHED = {  # backbone parameters of the published checkpoints, latent shape at the native resolution
    "sd15": (859_520_964, (4, 64, 64), "epsilon"), "sd21": (865_910_724, (4, 96, 96), "v_prediction"),
    "sd21-base": (865_910_724, (4, 64, 64), "epsilon"), "sdxl": (2_567_463_684, (4, 128, 128), "epsilon"),
    "pixart": (611_349_152, (4, 128, 128), "epsilon"), "pixart-512": (610_856_096, (4, 64, 64), "epsilon"),
    "sd3": (2_028_328_000, (16, 128, 128), "flow"), "flux": (11_901_408_320, (16, 128, 128), "flow"),
    "flux-schnell": (11_891_178_560, (16, 128, 128), "flow"),
    "wan21-t2v-1.3b": (1_418_996_800, (16, 21, 60, 104), "flow"),  # 81 frames at 480 x 832
    "wan21-i2v-14b-480p": (16_394_878_784, (16, 21, 60, 104), "flow"),
}


@pytest.mark.parametrize("model", REAL_MODELS)
def test_published_architectures_build_on_the_meta_device(model):
    teacher = build_teacher(model, "meta", torch.bfloat16, text_encoders="reduced")
    params, shape, prediction = PUBLISHED[model]
    assert sum(p.numel() for p in teacher.backbone.parameters()) == params
    assert teacher.sample_shape == shape and teacher.schedule.prediction_type == prediction
    assert all(p.device.type == "meta" for p in teacher.backbone.parameters())


def test_the_architecture_of_a_teacher_path():
    """teacher.path picks the asset by its hub ids (or a local folder named like the repo), else teacher.kind's."""
    assert model_for("sd", "stabilityai/stable-diffusion-2-1-base") == "sd21-base"
    assert model_for("sd", "/models/stable-diffusion-2-1/") == "sd21"
    assert model_for("pixart", "PixArt-alpha/PixArt-XL-2-512x512") == "pixart-512"
    assert model_for("flux", "black-forest-labs/FLUX.1-schnell") == "flux-schnell"
    assert model_for("sd", "someone/a-finetune") == "sd15" and model_for("gmm") is None


@pytest.mark.fullsize
@pytest.mark.parametrize("model", ["sd21", "pixart", "sd3", "flux"])
def test_published_architectures_take_their_conditioning_shapes(model):
    """A forward of the real backbone on the meta device with `fields_like` (what the planner traces with)."""
    teacher = build_teacher(model, "meta", torch.bfloat16, text_encoders="reduced")
    teacher.set_resolution(256)
    x = torch.randn(1, *teacher.sample_shape, device="meta")
    with torch.no_grad():
        out = teacher.call(teacher.backbone, x, torch.full((1,), 500.0), teacher.fields_like(1, "meta"))
    assert out.shape == x.shape


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_fields_like_has_the_shapes_of_encoded_prompts(kind):
    """The planner's conditioning without a text encoder has exactly the shapes and dtypes of real prompts'."""
    pipe = build_tiny_pipeline(kind)
    teacher = teacher_class(detect_kind(pipe))(pipe)
    encoded, like = teacher.encode(["a cat", "a dog"]).fields, teacher.fields_like(2, "cpu")
    assert {k: (v.shape, v.dtype) for k, v in like.items()} == {k: (v.shape, v.dtype) for k, v in encoded.items()}


def test_reduced_text_encoders_keep_the_conditioning_shapes():
    """text_encoders=reduced: one narrow layer each, the real output widths, so the prompt embeddings have the
    shapes the backbone takes (encoded here on the meta device)."""
    full, reduced = (build_teacher("flux", "meta", torch.bfloat16, te).pipe for te in ("full", "reduced"))
    assert sum(p.numel() for p in full.text_encoder_2.parameters()) > 4.7e9  # T5-XXL's encoder
    for name in ("text_encoder", "text_encoder_2"):
        assert getattr(full, name).config.hidden_size == getattr(reduced, name).config.hidden_size
        assert sum(p.numel() for p in getattr(reduced, name).parameters()) < 1e7
    with torch.no_grad():
        embeds, pooled, _ = reduced.encode_prompt([PROMPT], None, device="meta", max_sequence_length=512)
    assert embeds.shape == (1, 512, 4096) and pooled.shape == (1, 768)
