"""Wan text-to-video behind the Teacher adapter (tiny WanPipeline built offline, diffusers' own classes): the
teacher's sampler against WanPipeline's loop on the same noise, the clip length and its errors, Wan's UniPC flow
scheduler read as the same flow, clips decoded as the pipeline decodes them, and regression and DMD2 students that
train, resume, export, reload with plain diffusers and sample clips of the trained length."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline

from stepdistill.config import load_config
from stepdistill.pipelines import RECIPE_FILE
from stepdistill.schedules import NoiseSchedule
from stepdistill.teachers.loading import detect_kind, teacher_class
from stepdistill.teachers.tiny import build_tiny_pipeline, save_tiny_pipeline
from stepdistill.teachers.wan import WanTeacher
from stepdistill.training import Trainer

PROMPT = "a digit seven moving left"
FRAMES, PIXELS = 5, 32  # 2 latent frames of 4 x 4 latents (the VAE is 4x in time after frame 0, 8x in space)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_pipeline("wan", tmp_path_factory.mktemp("tiny") / "wan")


@pytest.fixture(scope="module")
def teacher():
    teacher = WanTeacher(build_tiny_pipeline("wan"))
    teacher.set_resolution(PIXELS)
    teacher.set_num_frames(FRAMES)
    return teacher


def test_a_wan_pipeline_is_a_wan_teacher_with_video_latents(teacher):
    assert detect_kind(teacher.pipe) == "wan" and teacher_class("wan") is WanTeacher
    assert teacher.sample_shape == (16, 2, 4, 4) and teacher.num_frames == FRAMES and teacher.makes_video
    assert teacher.resolution_multiple == 16  # 8x VAE times the transformer's 2x2 patch
    assert teacher.pipeline_call_kwargs() == {"num_frames": 5, "height": 32, "width": 32, "max_sequence_length": 512}


def test_clip_lengths_the_vae_cannot_make_are_refused_with_the_nearest_fit():
    teacher = WanTeacher(build_tiny_pipeline("wan"))
    with pytest.raises(ValueError, match=r"4k\+1 frames: use e.g. data.num_frames=9"):
        teacher.set_num_frames(8)
    with pytest.raises(ValueError, match="multiple of 16"):
        teacher.set_resolution(24)


def test_an_image_teacher_refuses_a_frame_count():
    from stepdistill.teachers.diffusers_teacher import SDTeacher

    with pytest.raises(ValueError, match="makes still images; set data.num_frames=0"):
        SDTeacher(build_tiny_pipeline("sd")).set_num_frames(9)


def test_teacher_sampler_matches_the_wan_pipeline(teacher):
    """Prompt states (512 tokens, zeroed past each prompt), the shift, the timestep and classifier-free guidance
    as WanPipeline feeds them: our flow Euler sampler equals the pipeline's loop on the same noise."""
    noise = torch.randn(1, *teacher.sample_shape)
    ours = teacher.sample(noise, teacher.encode([PROMPT]), num_steps=3, guidance=4.0)
    theirs = teacher.pipe(PROMPT, latents=noise.clone(), num_inference_steps=3, guidance_scale=4.0,
                          height=PIXELS, width=PIXELS, num_frames=FRAMES, output_type="latent").frames
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_decode_is_the_pipelines_own_clip(teacher):
    latents = torch.randn(1, *teacher.sample_shape)
    clip = teacher.decode(latents)
    frames = teacher.pipe(PROMPT, latents=latents.clone(), num_inference_steps=0, height=PIXELS, width=PIXELS,
                          num_frames=FRAMES, output_type="pt").frames  # no step: the latents decoded as they are
    assert clip.shape == (1, 3, FRAMES, PIXELS, PIXELS)
    torch.testing.assert_close(clip.permute(0, 2, 1, 3, 4), frames, atol=1e-5, rtol=1e-5)


def test_wans_unipc_flow_scheduler_is_read_as_its_shifted_flow():
    """The hub folders ship UniPCMultistepScheduler(use_flow_sigmas, flow_shift): the same shifted flow as
    FlowMatchEulerDiscreteScheduler(shift), not the VP schedule its betas would give."""
    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    ours = NoiseSchedule.from_scheduler_config(unipc.config)
    assert ours.kind == "flow" and ours.shift == 3.0
    assert ours.inference_timesteps(4) == NoiseSchedule.flow(3.0).inference_timesteps(4)


def _overrides(folder, out, max_steps, objective: list[str], extra=()):
    return ["teacher.kind=wan", f"teacher.path={folder}", "student.kind=copy", "student.timesteps=[1000.0]",
            f"data.resolution={PIXELS}", f"data.num_frames={FRAMES}", *objective, f"train.output_dir={out}",
            f"train.max_steps={max_steps}", "train.batch_size=2", "train.checkpoint_every=2", "train.report_to=none",
            "train.num_validation_samples=1", "train.progress=false", "train.mixed_precision='no'", *extra]


REGRESSION = ["objective.name=regression", "objective.pairs.num=4", "objective.pairs.steps=2",
              "objective.pairs.guidance=4.0", "objective.lr=1.0e-3"]
DMD2 = ["objective.name=dmd2", "objective.real_guidance=4.0", "objective.critic_updates=1", "objective.generator_lr=1.0e-4"]


@pytest.mark.parametrize("objective", [REGRESSION, DMD2], ids=["regression", "dmd2"])
def test_train_resume_export_and_reload_with_plain_diffusers(folder, tmp_path, objective):
    out = tmp_path / "run"
    first = Trainer(load_config(None, _overrides(folder, out, 2, objective))).train()
    assert first.step == 2 and (out / "checkpoints" / "checkpoint-2").is_dir()
    trainer = Trainer(load_config(None, _overrides(folder, out, 3, objective, ["train.resume=latest"])))
    result = trainer.train()
    assert result.step == 3 and {int(s["step"]) for s in trainer.optimizers["generator"].state.values()} == {3}

    generator = trainer.generator_for_inference()
    teacher = generator.teacher
    assert teacher.sample_shape == (16, 2, 4, 4)
    assert any(not torch.equal(p, q) for p, q in zip(generator.backbone.parameters(), teacher.backbone.parameters()))
    pipe = DiffusionPipeline.from_pretrained(str(result.final_dir))
    recipe = json.loads((result.final_dir / RECIPE_FILE).read_text())
    assert type(pipe) is WanPipeline and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    # WanPipeline takes no sigmas: one step at sigma 1 is its own 1-step grid; the clip's size is in the recipe
    assert recipe["pipeline_kwargs"] == {"num_inference_steps": 1, "guidance_scale": 0.0, "num_frames": FRAMES,
                                         "height": PIXELS, "width": PIXELS, "max_sequence_length": 512}
    noise = torch.randn(2, *teacher.sample_shape)
    latents = pipe([PROMPT] * 2, latents=noise.clone(), output_type="latent", **recipe["pipeline_kwargs"]).frames
    assert pipe.scheduler.timesteps.tolist() == [1000.0]
    torch.testing.assert_close(latents, generator.sample(noise, teacher.encode([PROMPT] * 2)), atol=1e-4, rtol=1e-4)
    frames = pipe(PROMPT, output_type="np", **recipe["pipeline_kwargs"]).frames
    assert frames.shape == (1, FRAMES, PIXELS, PIXELS, 3) and np.isfinite(frames).all()


def test_a_preview_of_clips_shows_each_clips_frames_side_by_side(tmp_path):
    from PIL import Image

    from stepdistill.visualize import image_grid

    clips = torch.rand(2, 3, FRAMES, 8, 8)
    strips = torch.cat(list(clips.unbind(2)), dim=-1)  # [2, 3, 8, 5 * 8]: frame 0 | frame 1 | ...
    a, b = image_grid(clips, tmp_path / "clips.png"), image_grid(strips, tmp_path / "strips.png")
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_sample_writes_each_clip_as_gif_mp4_and_a_frame_strip(teacher, tmp_path):
    from PIL import Image

    from stepdistill.config import StudentConfig
    from stepdistill.export import export_student
    from stepdistill.sample import sample
    from stepdistill.students.build import build_student

    folder = export_student(build_student(teacher, StudentConfig(timesteps=[1000.0])), teacher, tmp_path / "export")
    record = sample(folder, [PROMPT], num=2, seed=0, out=tmp_path / "samples")
    assert record["images"] == 2 * 3 and record["call"]["num_frames"] == FRAMES
    gif = Image.open(tmp_path / "samples" / "00-a-digit-seven-moving-left-seed1.gif")
    assert gif.n_frames == FRAMES and gif.size == (PIXELS, PIXELS)
    strip = Image.open(tmp_path / "samples" / "00-a-digit-seven-moving-left-seed1.png")
    assert strip.size == (FRAMES * PIXELS, PIXELS)
    import imageio.v3 as iio

    video = iio.imread(tmp_path / "samples" / "00-a-digit-seven-moving-left-seed0.mp4")
    assert video.shape[0] == FRAMES and video.shape[1:3] == (PIXELS, PIXELS)


def test_the_planner_counts_frames_and_knows_the_published_wan_architecture():
    """The meta-device trace takes the clip's latent frames: more frames, more activation memory, the same weights;
    the published Wan 2.1 T2V-1.3B architecture builds on the meta device with its parameter counts."""
    from stepdistill.perf.arch import build_teacher, model_for
    from stepdistill.perf.memory import build_meta_objective, estimate

    def planned(frames: int):
        cfg = load_config(None, ["teacher.kind=wan", "objective.name=dmd2", "student.timesteps=[1000.0]",
                                 "data.resolution=128", f"data.num_frames={frames}", "train.batch_size=1"])
        return estimate(build_meta_objective(cfg, "tiny-wan"), 1)

    short, long = planned(5), planned(17)
    assert long.weights == short.weights and long.activations > 1.5 * short.activations
    assert model_for("wan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers") == "wan21-t2v-1.3b"
    real = build_teacher("wan21-t2v-1.3b", "meta", torch.bfloat16)
    assert sum(p.numel() for p in real.backbone.parameters()) == 1_418_996_800  # 1.3B: dim 1536, 30 layers
    assert sum(p.numel() for p in real.pipe.text_encoder.parameters()) == 5_680_910_336  # UMT5-XXL encoder
    assert real.sample_shape == (16, 21, 60, 104) and real.schedule.shift == 3.0  # 81 frames at 480 x 832


# ---------------------------------------------------------------------------------------------- image-to-video
def _frames_folder(folder, n: int = 3, captions: bool = True):
    """First frames at the clip's size, PNGs captioned by their prompts (metadata.jsonl)."""
    from PIL import Image

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        pixels = (torch.rand(PIXELS, PIXELS, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"{PROMPT} {i}"}))
    if captions:
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def i2v_teacher():
    from stepdistill.teachers.wan import WanI2VTeacher

    teacher = WanI2VTeacher(build_tiny_pipeline("wan_i2v"))
    teacher.set_resolution(PIXELS)
    teacher.set_num_frames(FRAMES)
    return teacher


def test_i2v_teacher_sampler_matches_the_image_to_video_pipeline(i2v_teacher, tmp_path):
    """The first frame's 20 condition channels (mask + VAE latents of the frame and black frames) and its CLIP
    tokens as WanImageToVideoPipeline builds them; guidance drops only the prompt."""
    from PIL import Image

    from stepdistill.data.images import ImageFolderDataset

    frames = ImageFolderDataset(_frames_folder(tmp_path / "frames"), PIXELS)
    image = (frames[0]["image"][None] + 1) / 2
    cond = i2v_teacher.encode([PROMPT]).with_shared(i2v_teacher.image_fields(image))
    assert cond.fields["condition"].shape == (1, 20, 2, 4, 4) and cond.fields["condition"][:, :4, 0].eq(1).all()
    assert torch.equal(cond.null["condition"], cond.fields["condition"])
    noise = torch.randn(1, *i2v_teacher.sample_shape)
    ours = i2v_teacher.sample(noise, cond, num_steps=3, guidance=4.0)
    theirs = i2v_teacher.pipe(image=Image.open(frames.files[0]), prompt=PROMPT, latents=noise.clone(),
                              num_inference_steps=3, guidance_scale=4.0, height=PIXELS, width=PIXELS,
                              num_frames=FRAMES, output_type="latent").frames
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_an_image_conditioned_teacher_needs_captioned_frames(folder_i2v, tmp_path):
    base = ["teacher.kind=wan_i2v", f"teacher.path={folder_i2v}", "objective.name=regression",
            "student.timesteps=[1000.0]", f"data.resolution={PIXELS}", f"data.num_frames={FRAMES}"]
    from stepdistill.objectives import build_objective

    with pytest.raises(ValueError, match="conditioned on an image as well as a prompt: set data.image_dir"):
        build_objective(load_config(None, base))
    uncaptioned = _frames_folder(tmp_path / "bare", captions=False)
    with pytest.raises(ValueError, match="has no metadata.jsonl"):
        build_objective(load_config(None, [*base, f"data.image_dir={uncaptioned}"]))


@pytest.fixture(scope="module")
def folder_i2v(tmp_path_factory):
    return save_tiny_pipeline("wan_i2v", tmp_path_factory.mktemp("tiny") / "wan_i2v")


@pytest.mark.parametrize("objective", [REGRESSION, DMD2], ids=["regression", "dmd2"])
def test_i2v_students_train_resume_export_and_reload(folder_i2v, tmp_path, objective):
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    frames = _frames_folder(tmp_path / "frames")
    out = tmp_path / "run"
    extra = ["teacher.kind=wan_i2v", f"data.image_dir={frames}"]
    Trainer(load_config(None, _overrides(folder_i2v, out, 2, objective, extra))).train()
    trainer = Trainer(load_config(None, _overrides(folder_i2v, out, 3, objective, [*extra, "train.resume=latest"])))
    result = trainer.train()
    assert result.step == 3
    generator = trainer.generator_for_inference()
    source = trainer.objective.source
    assert source.prompts == [f"{PROMPT} {i}" for i in range(3)]
    pipe = DiffusionPipeline.from_pretrained(str(result.final_dir))
    recipe = json.loads((result.final_dir / RECIPE_FILE).read_text())
    assert type(pipe) is WanImageToVideoPipeline and recipe["pipeline_kwargs"]["num_frames"] == FRAMES
    noise = torch.randn(1, *generator.teacher.sample_shape)
    latents = pipe(image=Image.open(frames / "1.png"), prompt=source.prompts[1], latents=noise.clone(),
                   output_type="latent", **recipe["pipeline_kwargs"]).frames
    expected = generator.sample(noise, source.encode(torch.tensor([1])))
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)


def test_sample_an_i2v_export_from_a_first_frame_and_refusals(i2v_teacher, tmp_path):
    from stepdistill.config import ConfigError, StudentConfig
    from stepdistill.export import export_student
    from stepdistill.sample import sample
    from stepdistill.students.build import build_student

    folder = export_student(build_student(i2v_teacher, StudentConfig(timesteps=[1000.0])), i2v_teacher,
                            tmp_path / "export")
    frame = _frames_folder(tmp_path / "frames") / "0.png"
    with pytest.raises(ConfigError, match="image-conditioned pipeline .WanImageToVideoPipeline.: give its input image"):
        sample(folder, [PROMPT], num=1, seed=0, out=tmp_path / "none")
    record = sample(folder, [PROMPT], num=1, seed=0, out=tmp_path / "samples", image=frame)
    assert record["images"] == 3 and (tmp_path / "samples" / "00-a-digit-seven-moving-left-seed0.gif").is_file()


def test_the_sliding_window_chains_windows_by_their_last_frame(i2v_teacher, tmp_path):
    """Each window after the first is conditioned on the previous window's last frame and drops its re-rendered
    first frame: 3 windows of 5 frames give 13; the seam distances come from the transitions that cross windows."""
    from PIL import Image

    from stepdistill.pipelines.sliding import seam_distances, sliding_window

    pipe = i2v_teacher.pipe
    pipe.set_progress_bar_config(disable=True)
    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs["image"])
        return type(pipe).__call__(pipe, *args, **kwargs)

    frame = Image.open(_frames_folder(tmp_path / "frames") / "0.png")
    frames = sliding_window(recording, PROMPT, frame, 3, num_inference_steps=1, height=PIXELS, width=PIXELS,
                            num_frames=FRAMES, generator=torch.Generator().manual_seed(0))
    assert len(frames) == 3 * (FRAMES - 1) + 1 and seen[0] is frame
    assert seen[1] is frames[FRAMES - 1] and seen[2] is frames[2 * (FRAMES - 1)]
    seam, inside = seam_distances(frames, FRAMES)
    assert seam > 0 and inside > 0
    with pytest.raises(ValueError, match="no seam"):
        seam_distances(frames[:FRAMES], FRAMES)


def test_seam_distances_separate_the_transitions_across_windows():
    from PIL import Image

    from stepdistill.pipelines.sliding import seam_distances

    black, white = Image.new("RGB", (4, 4), "black"), Image.new("RGB", (4, 4), "white")
    # two windows of 3 frames chained: black black black | white white (a jump exactly at the seam)
    assert seam_distances([black, black, black, white, white], 3) == (1.0, 0.0)
    assert seam_distances([black, white, black, black, white], 3) == (0.0, 1.0)
