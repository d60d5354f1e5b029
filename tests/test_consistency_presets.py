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
from diffusers import (DDIMScheduler, DiffusionPipeline, EulerDiscreteScheduler, LCMScheduler,
                       StableDiffusionPipeline, StableDiffusionXLPipeline)

from stepdistill.cli import main
from stepdistill.config import load_config
from stepdistill.export import export_student, load_mlp_student
from stepdistill.objectives.consistency import AdaptersOff, guidance_embedding, with_guidance_embedding
from stepdistill.pipelines import RECIPE_FILE, load_exported
from stepdistill.students import SegmentGenerator
from stepdistill.teachers.tiny import save_tiny_pipeline
from stepdistill.training import Trainer, build_objective

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
            "train.gradient_checkpointing=false", "objective.num_pairs=4", "objective.pair_steps=2",
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
