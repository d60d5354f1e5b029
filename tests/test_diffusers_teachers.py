"""Diffusers-backed teachers on tiny SD1.x, SDXL, PixArt, SD3-style and Flux pipelines built offline."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from stepdistill.config import TeacherConfig
from stepdistill.teachers import load_teacher
from stepdistill.teachers.diffusers_teacher import PixArtTeacher, SD3Teacher, SDTeacher, SDXLTeacher
from stepdistill.teachers.flux import FluxTeacher
from stepdistill.teachers.tiny import TINY_KINDS, build_tiny_pipeline, save_tiny_pipeline

PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
             "pixart": "PixArtAlphaPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
TEACHERS = {"sd": SDTeacher, "sdxl": SDXLTeacher, "pixart": PixArtTeacher, "sd3": SD3Teacher, "flux": FluxTeacher}
CFG_KINDS = [k for k in TINY_KINDS if k != "flux"]  # Flux-dev embeds its guidance instead (tests/test_flux.py)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {k: save_tiny_pipeline(k, root / k) for k in TINY_KINDS}


@pytest.fixture(scope="module")
def teachers(folders):
    return {k: load_teacher(TeacherConfig(kind="auto", path=str(f)), "cpu") for k, f in folders.items()}


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_tiny_pipeline_round_trips_through_plain_diffusers(kind, folders, teachers):
    pipe = DiffusionPipeline.from_pretrained(str(folders[kind]))
    assert type(pipe).__name__ == PIPELINES[kind]
    name = "unet" if kind in ("sd", "sdxl") else "transformer"
    built = getattr(build_tiny_pipeline(kind), name).state_dict()
    loaded = getattr(pipe, name).state_dict()
    assert built.keys() == loaded.keys() and all(torch.equal(built[k], loaded[k]) for k in built)
    teacher = teachers[kind]
    assert type(teacher) is TEACHERS[kind] and teacher.needs_prompts
    assert teacher.sample_shape == (4, 8, 8)
    assert str(folders[kind]) in teacher.identity and kind in teacher.identity


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_predict_shapes_dtypes_and_prompt_cache(kind, teachers, monkeypatch):
    teacher = teachers[kind]
    cond = teacher.encode(["a cat", "a dog", "a cat"])
    assert len(cond) == 3 and set(cond.fields) == set(cond.null)
    for k, v in cond.fields.items():
        assert v.shape[0] == 3 and cond.null[k].shape == v.shape
    h = cond.fields["encoder_hidden_states"]
    assert torch.equal(h[0], h[2]) and not torch.equal(h[0], h[1])
    with monkeypatch.context() as m:  # cached prompts need no encoder call
        m.setattr(teacher.pipe, "encode_prompt", None)
        again = teacher.encode(["a dog", "a cat"])
    torch.testing.assert_close(again.fields["encoder_hidden_states"], h[[1, 0]], atol=0, rtol=0)
    x = torch.randn(3, *teacher.sample_shape)
    t = torch.full((3,), 500.0)
    pred = teacher.predict(x, t, cond, guidance=2.0)
    assert pred.x0.shape == pred.eps.shape == x.shape
    assert pred.x0.dtype == pred.eps.dtype == torch.float32 and torch.isfinite(pred.x0).all()
    # x_t = alpha x0 + sigma eps holds for the converted prediction
    a, s = teacher.schedule.alpha_sigma(t)
    torch.testing.assert_close((a.view(-1, 1, 1, 1) * pred.x0 + s.view(-1, 1, 1, 1) * pred.eps).float(), x,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", CFG_KINDS)
def test_guidance_in_one_batched_call_equals_two_separate_calls(kind, teachers):
    teacher = teachers[kind]
    cond = teacher.encode(["a cat", "a lighthouse"])
    x, t, w = torch.randn(2, *teacher.sample_shape), torch.tensor([999.0, 300.0]), 4.0
    guided = teacher.guided_output(x, t, cond, w)
    cond_out = teacher.model_output(x, t, cond.fields)
    uncond_out = teacher.model_output(x, t, cond.null)
    assert (cond_out - uncond_out).abs().max() > 1e-4  # the prompt matters, so the check below has teeth
    torch.testing.assert_close(guided, uncond_out + w * (cond_out - uncond_out), atol=1e-5, rtol=1e-4)


def test_sdxl_null_prompt_is_zeros_with_force_zeros(teachers):
    cond = teachers["sdxl"].encode(["a cat"])
    assert not cond.null["encoder_hidden_states"].any() and not cond.null["text_embeds"].any()
    assert torch.equal(cond.null["time_ids"], cond.fields["time_ids"])
    assert cond.fields["time_ids"][0].tolist() == [16, 16, 0, 0, 16, 16]


@pytest.mark.parametrize("kind,steps", [("sd", 1), ("sd", 4), ("sd3", 3)])
def test_teacher_sampler_matches_the_diffusers_pipeline(kind, steps, folders, teachers):
    """Our DDIM (trailing) / flow Euler sampler with CFG equals the pipeline's own loop on the same noise."""
    teacher = teachers[kind]
    pipe = DiffusionPipeline.from_pretrained(str(folders[kind]))
    if kind == "sd":  # DDIM with trailing spacing ending at x0, as Teacher.sample (DDIM steps t -> t - T//N,
        # which is the next trailing grid point when N divides T)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                   set_alpha_to_one=True)
    noise = torch.randn(1, *teacher.sample_shape)
    ours = teacher.sample(noise, teacher.encode(["a red car"]), num_steps=steps, guidance=3.0)
    theirs = pipe("a red car", latents=noise.clone(), num_inference_steps=steps, guidance_scale=3.0,
                  output_type="latent").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_decode_matches_the_pipeline_vae_path(kind, folders, teachers):
    teacher = teachers[kind]
    pipe = DiffusionPipeline.from_pretrained(str(folders[kind]))
    noise = torch.randn(1, *teacher.sample_shape)
    latents = pipe("a cat", latents=noise.clone(), num_inference_steps=1, output_type="latent").images
    images = pipe("a cat", latents=noise.clone(), num_inference_steps=1, output_type="pt").images
    decoded = teacher.decode(latents)
    assert decoded.shape == (1, 3, 16, 16) and 0 <= decoded.min() and decoded.max() <= 1
    torch.testing.assert_close(decoded, images, atol=1e-5, rtol=1e-5)


def test_build_backbone_is_a_trainable_fp32_copy(teachers):
    teacher = teachers["sd"]
    net = teacher.build_backbone()
    assert all(p.requires_grad and p.dtype == torch.float32 for p in net.parameters())
    assert not any(p.requires_grad for p in teacher.backbone.parameters())
    cond, x, t = teacher.encode(["a cat"]), torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    torch.testing.assert_close(teacher.call(net, x, t, cond.fields), teacher.model_output(x, t, cond.fields))
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    assert not torch.equal(next(net.parameters()), next(teacher.backbone.parameters()))


def test_bf16_teacher_returns_fp32_and_student_stays_fp32(folders):
    teacher = load_teacher(TeacherConfig(kind="sd", path=str(folders["sd"]), dtype="bf16"), "cpu")
    assert next(teacher.backbone.parameters()).dtype == torch.bfloat16
    assert next(teacher.pipe.vae.parameters()).dtype == torch.float32
    out = teacher.model_output(torch.randn(2, 4, 8, 8), torch.tensor([999.0, 10.0]), teacher.encode(["a", "b"]).fields)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert next(teacher.build_backbone().parameters()).dtype == torch.float32


def test_offline_hub_id_error_says_how_to_pass_a_local_folder():
    cfg = TeacherConfig(kind="sd", path="nobody-here/not-a-cached-pipeline", local_files_only=True)
    with pytest.raises(FileNotFoundError, match=r"teacher\.path=/path/to/pipeline_folder"):
        load_teacher(cfg, "cpu")


def test_folder_without_model_index_is_a_clear_error(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_teacher(TeacherConfig(kind="auto", path=str(tmp_path)), "cpu")


def test_kind_that_does_not_match_the_folder_is_refused(folders):
    with pytest.raises(ValueError, match="teacher.kind=sd "):
        load_teacher(TeacherConfig(kind="sdxl", path=str(folders["sd"])), "cpu")


def test_data_resolution_sets_the_latent_size_of_a_latent_teacher(folders, tmp_path):
    """data.resolution: a 32 px run of the 16 px tiny SDXL gives 16x16 latents (and SDXL's size conditioning
    follows); a side the VAE cannot produce is refused with the nearest valid one."""
    from stepdistill.config import load_config
    from stepdistill.objectives import build_objective

    overrides = ["objective.name=regression", "teacher.kind=auto", f"teacher.path={folders['sdxl']}",
                 "data.resolution=32", f"train.output_dir={tmp_path}"]
    objective = build_objective(load_config(None, overrides))
    teacher = objective.teacher
    assert teacher.sample_shape == (4, 16, 16)
    assert teacher.encode(["a cat"]).fields["time_ids"][0].tolist() == [32, 32, 0, 0, 32, 32]
    x = torch.randn(1, *teacher.sample_shape)
    assert teacher.predict(x, torch.full((1,), 500.0), teacher.encode(["a cat"])).x0.shape == x.shape
    with pytest.raises(ValueError, match="data.resolution=33 is not a multiple of 2.*data.resolution=32"):
        build_objective(load_config(None, overrides[:-2] + ["data.resolution=33", f"train.output_dir={tmp_path}"]))
