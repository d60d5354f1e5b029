"""VSD (SwiftBrush, SNOOPI's PG-SB) and SiD presets on tiny SD1.5 and PixArt teachers, through the CLI: each trains,
resumes bit for bit from a mid-run checkpoint, exports a pipeline folder that plain diffusers loads and samples,
and NASA (negative-prompt attention) runs on the SD1.5 and PixArt exports."""
import json

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from reliability_utils import assert_same, checkpoint_state

from stepdistill.cli import main
from stepdistill.pipelines import RECIPE_FILE
from stepdistill.pipelines.nasa import NASAAttnProcessor, nasa_pipeline
from stepdistill.teachers.tiny import save_tiny_pipeline

RUNS = [  # (preset, objective, tiny teacher, extra overrides)
    ("configs/swiftbrush_sd21.yaml", "vsd", "sd", []),
    ("configs/snoopi_sd15.yaml", "vsd", "sd", []),
    ("configs/snoopi_pixart.yaml", "vsd", "pixart", []),
    ("configs/sid_sd15.yaml", "sid", "sd", []),
    ("configs/sid_sd15.yaml", "sid", "pixart", ["teacher.kind=pixart", "student.timesteps=[999]"]),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {k: save_tiny_pipeline(k, root / k) for k in ("sd", "pixart")}


def overrides(folder, out, extra=(), **train):
    settings = {"max_steps": 4, "checkpoint_every": 2, **train}
    return [f"teacher.path={folder}", f"train.output_dir={out}", "train.batch_size=2", "train.report_to=none",
            "train.num_validation_samples=2", "train.progress=false", "train.mixed_precision='no'",
            "train.gradient_checkpointing=false", "objective.critic_lora_rank=4", "objective.generator_lr=1e-4",
            "objective.critic_lr=1e-3", "train.ema_decay=0.9",
            *[f"train.{k}={v}" for k, v in settings.items()], *extra]


def sample(folder, **kwargs):
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    extra = {"use_resolution_binning": False} if "PixArt" in recipe["pipeline_class"] else {}
    g = torch.Generator().manual_seed(0)
    out = pipe(["a photo of a cat"], output_type="latent", generator=g, **recipe["pipeline_kwargs"], **extra,
               **kwargs).images
    return pipe, recipe, out


@pytest.mark.parametrize("preset,name,kind,extra", RUNS)
def test_preset_trains_resumes_bitwise_and_exports(preset, name, kind, extra, tiny, tmp_path, capsys):
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    assert main(["train", "--config", preset, *overrides(tiny[kind], ref, extra)]) == 0
    assert main(["train", "--config", preset, *overrides(tiny[kind], resumed, extra,
                                                         resume=ref / "checkpoints" / "checkpoint-2")]) == 0
    assert_same(checkpoint_state(ref / "checkpoints" / "checkpoint-4"),
                checkpoint_state(resumed / "checkpoints" / "checkpoint-4"))
    pipe, recipe, latents = sample(ref / "final")
    assert recipe["objective"] == name
    assert recipe["guidance_scale"] == 0.0 and pipe.scheduler.timesteps.tolist() == recipe["student_timesteps"]
    assert torch.isfinite(latents).all() and latents.shape[0] == 1


@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory):
    """One-step VSD students of the tiny SD1.5 and PixArt teachers (2 steps: NASA only needs a trained export)."""
    out = {}
    for kind, preset in (("sd", "configs/swiftbrush_sd21.yaml"), ("pixart", "configs/snoopi_pixart.yaml")):
        run = tmp_path_factory.mktemp(f"nasa-{kind}")
        assert main(["train", "--config", preset, *overrides(tiny[kind], run, max_steps=2, checkpoint_every=0)]) == 0
        out[kind] = run / "final"
    return out


@pytest.mark.parametrize("kind", ["sd", "pixart"])
def test_nasa_runs_on_an_exported_student(kind, exports):
    """The export reloads as a NASA pipeline; nasa_scale=0 (or no negative prompt) is the plain pipeline bit for
    bit, a negative prompt with nasa_scale > 0 changes the sample, and CFG on top of NASA is refused."""
    folder = exports[kind]
    plain, recipe, base = sample(folder)
    pipe = nasa_pipeline(plain)
    assert type(pipe).__name__.startswith("NASA")
    extra = {"use_resolution_binning": False} if kind == "pixart" else {}

    def run(**kwargs):
        g = torch.Generator().manual_seed(0)
        return pipe(["a photo of a cat"], output_type="latent", generator=g, **recipe["pipeline_kwargs"], **extra,
                    **kwargs).images

    torch.testing.assert_close(run(), base, rtol=0, atol=0)
    torch.testing.assert_close(run(negative_prompt="a dog", nasa_scale=0.0), base, rtol=0, atol=0)
    steered = run(negative_prompt="a dog", nasa_scale=0.5)
    assert torch.isfinite(steered).all() and (steered - base).abs().max() > 1e-4
    processors = list(getattr(pipe, "unet" if kind == "sd" else "transformer").attn_processors.values())
    assert processors and all(isinstance(p, NASAAttnProcessor) for p in processors)
    assert processors[0].state.num_tokens == 0  # reset after the call
    with pytest.raises(ValueError, match="guidance_scale <= 1"):
        run_kwargs = {k: v for k, v in recipe["pipeline_kwargs"].items() if k != "guidance_scale"}
        pipe(["a cat"], negative_prompt="a dog", nasa_scale=0.5, guidance_scale=3.0, output_type="latent",
             **run_kwargs, **extra)


def test_nasa_processor_is_z_plus_minus_alpha_z_minus(tiny):
    """One cross-attention layer of the tiny SD UNet: the NASA output equals the layer run on the prompt's tokens
    minus alpha times its attention on the negative tokens (before the output projection), computed by hand with
    diffusers' own processor; with only the prompt's tokens it is diffusers' processor."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from stepdistill.pipelines.nasa import NASAState

    pipe = DiffusionPipeline.from_pretrained(str(tiny["sd"]))
    attn = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn2"))
    torch.manual_seed(0)
    hidden, pos, neg = torch.randn(2, 16, attn.query_dim), torch.randn(2, 77, 32), torch.randn(2, 77, 32)
    state = NASAState(num_tokens=77, scale=0.3)
    out = NASAAttnProcessor(state)(attn, hidden, torch.cat([pos, neg], dim=1))
    captured = []
    hook = attn.to_out[0].register_forward_hook(lambda m, i, o: captured.append(i[0]))
    with torch.no_grad():
        AttnProcessor2_0()(attn, hidden, pos)
        AttnProcessor2_0()(attn, hidden, neg)
    hook.remove()
    expected = attn.to_out[0](captured[0] - 0.3 * captured[1]) / attn.rescale_output_factor
    torch.testing.assert_close(out, expected)
    state.num_tokens = 0
    torch.testing.assert_close(NASAAttnProcessor(state)(attn, hidden, pos), AttnProcessor2_0()(attn, hidden, pos))


def test_nasa_refuses_pipelines_it_does_not_cover(tiny):
    pipe = DiffusionPipeline.from_pretrained(str(tiny["sd"]))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    assert type(nasa_pipeline(pipe)).__name__ == "NASAStableDiffusionPipeline"
    with pytest.raises(ValueError, match="NASA has no pipeline for"):
        nasa_pipeline(object())
