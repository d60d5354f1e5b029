"""The configuration schema: one dataclass per section, with the valid choices and ranges of each key. Torch-free."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the key and the fix."""


@dataclass
class TeacherConfig:
    # gmm | sd | sdxl | pixart | sd3 | flux | auto (detect from the pipeline folder) | mlp (an exported multistep MLP
    # student of ours over the GMM below, e.g. a reflow round's k-rectified flow)
    kind: str = "gmm"
    path: str = ""  # hub id or local diffusers pipeline folder; kind mlp: the export folder (not for gmm)
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    local_files_only: bool = False
    revision: str = ""
    variant: str = ""
    # analytic teacher (kind: gmm; kind mlp: the true data its metrics compare with)
    num_modes: int = 8
    radius: float = 1.0
    std: float = 0.1
    num_classes: int = 0
    own_weight: float = 0.25
    schedule: str = "vp"  # vp (SD's scaled_linear, eps) | flow (SD3-style, shift below)
    flow_shift: float = 1.0
    backbone_hidden: int = 256
    backbone_depth: int = 4
    trust_remote_code: bool = False  # allow a pipeline folder whose components need custom Python code
    # frozen backbone's weights in CPU memory, streamed to the accelerator per forward (accelerate's cpu_offload);
    # only for a separate teacher copy (not a shared-base critic or consistency's teacher_net=lora_base)
    offload: bool = False

    CHOICES = {"kind": ("gmm", "sd", "sdxl", "pixart", "sd3", "flux", "wan", "wan_i2v",
                        "sd_upscale", "auto", "mlp"),
               "dtype": ("auto", "fp32", "bf16", "fp16"), "schedule": ("vp", "flow")}
    RANGES = {"num_modes": ">=1", "radius": ">0", "std": ">0", "num_classes": ">=0", "flow_shift": ">0",
              "backbone_hidden": ">=1", "backbone_depth": ">=1"}


# LoRA targets of the diffusers LCM-LoRA / DMD2 SDXL recipes (attention, feed-forward, resnet convs, time MLP).
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


@dataclass
class StudentConfig:
    kind: str = "copy"  # copy | smaller | lora
    timesteps: list[float] = field(default_factory=lambda: [999])  # time of each sampling step, student's axis
    schedule: str = "teacher"  # teacher (the teacher's noise schedule) | flow (a rectified-flow student)
    flow_shift: float = 1.0  # schedule=flow: the resolution shift of the student's own flow schedule
    prediction_type: str | None = None  # None: the parameterization of the student's schedule
    width: float = 1.0  # `smaller`: the teacher's channel widths times this ratio (before `overrides`)
    overrides: dict = field(default_factory=dict)  # backbone config overrides for `smaller`
    lora_rank: int = 64
    lora_alpha: float = 64.0
    lora_targets: list[str] = field(default_factory=lambda: list(UNET_LORA_TARGETS))
    # weights to start from instead of the teacher's: an exported student folder (final/), a diffusers model folder
    # or a .safetensors file of this backbone (a LoRA student: an exported LoRA student's adapter)
    init: str = ""

    CHOICES = {"kind": ("copy", "smaller", "lora"), "schedule": ("teacher", "flow"),
               "prediction_type": (None, "epsilon", "v_prediction", "sample", "flow")}
    RANGES = {"lora_rank": ">=1", "lora_alpha": ">0", "flow_shift": ">0", "width": "(0,1]"}


@dataclass
class PairsConfig:
    """A cache of teacher ODE samples from fixed noise (regression targets, reflow couplings, consistency data):
    the same keys for every objective that uses one."""

    num: int = 10000
    steps: int = 50  # steps of the teacher's deterministic sampler (DDIM / flow Euler)
    guidance: float = 1.0  # teacher CFG scale, standard form (1 = off)
    seed: int = 0
    dir: str = ""  # default: <train.output_dir>/pairs

    RANGES = {"num": ">=1", "steps": ">=1", "guidance": ">=0"}


@dataclass
class PartitionConfig:
    """One part of the condition space (multi-student distillation): the conditions are split into `parts`
    balanced parts (stepdistill.data.partition) and a run samples only those of `part`."""

    parts: int = 1  # 1: every condition
    part: int = 0  # 0..parts-1
    rule: str = "auto"  # auto | classes (contiguous class ranges) | embeddings (balanced k-means of text embeddings)
    seed: int = 0  # seeds the clustering (embeddings)
    dir: str = ""  # where the fitted partition is saved; default: <train.output_dir>/partition

    CHOICES = {"rule": ("auto", "classes", "embeddings")}
    RANGES = {"parts": ">=1", "part": ">=0"}


@dataclass
class DataConfig:
    prompts_file: str = ""  # one prompt per line (text teachers); empty: a small built-in list
    num_workers: int = 0
    image_dir: str = ""  # a folder of real images (e.g. a GAN real branch); checked before training
    resolution: int = 0  # image side in pixels the student produces; 0: the teacher's default
    num_frames: int = 0  # frames of a video teacher's clips (Wan: 4k+1); 0: the teacher's default
    bad_images: str = "refuse"  # refuse | skip: what unreadable or mis-sized files in image_dir do
    partition: PartitionConfig = field(default_factory=PartitionConfig)

    CHOICES = {"bad_images": ("refuse", "skip")}
    RANGES = {"num_workers": ">=0", "resolution": ">=0", "num_frames": ">=0"}


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = 1000
    batch_size: int = 64
    seed: int = 0
    mixed_precision: str = "auto"  # auto (bf16 on GPU) | no | bf16 | fp16
    gradient_checkpointing: bool = False
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    # 0 disables the generator EMA. diffusers' EMAModel ramps the decay as (1 + n) / (10 + n) over the n generator
    # updates and caps it there, so ema_decay binds only after (10 d - 1) / (1 - d) updates (890 at 0.99)
    ema_decay: float = 0.0
    checkpoint_every: int = 500
    checkpoints_limit: int = 2
    # "" | latest (the newest checkpoint; refused if it is corrupt) | latest-valid (the newest intact one) | a
    # checkpoint folder
    resume: str = ""
    overwrite: bool = False  # start afresh in an output_dir that holds a run: the old run is moved aside, kept
    log_every: int = 50
    report_to: str = "auto"  # auto (tensorboard where installed) | tensorboard | wandb | none
    validate_every: int = 0  # 0: only at the end
    num_validation_samples: int = 16
    sample_stats_every: int = 0  # log the student's sample statistics and warn on collapse (training/guards.py)
    nonfinite: str = "stop"  # stop | skip: what a non-finite loss or gradient does
    device_threads: int = 0  # torch CPU threads; 0 leaves torch's default
    progress: bool = True
    # speed and memory (issue 7): each is measured by eval/speed.py and counted by eval/plan.py
    optimizer: str = "adamw"  # adamw | adamw_fused (torch's fused kernel) | adamw_8bit (bitsandbytes, 1/4 the state)
    compile: bool = False  # torch.compile the trainable backbones and the teacher's backbone, in place
    channels_last: bool = False  # backbones' conv weights in channels_last memory format (no effect on MLPs)
    attention: str = "sdpa"  # sdpa (diffusers' AttnProcessor2_0) | xformers (pip install -e ".[xformers]")

    CHOICES = {"mixed_precision": ("auto", "no", "bf16", "fp16"),
               "report_to": ("auto", "tensorboard", "wandb", "none"),
               "nonfinite": ("stop", "skip"), "optimizer": ("adamw", "adamw_fused", "adamw_8bit"),
               "attention": ("sdpa", "xformers"),
               "lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine")}
    RANGES = {"max_steps": ">=1", "batch_size": ">=1", "lr_warmup_steps": ">=0", "ema_decay": "[0,1)",
              "checkpoint_every": ">=0", "checkpoints_limit": ">=1", "log_every": ">=1", "validate_every": ">=0",
              "num_validation_samples": ">=1", "device_threads": ">=0",
              "sample_stats_every": ">=0"}


@dataclass
class Config:
    objective: Any = None  # an ObjectiveConfig subclass chosen by objective.name
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe: list = field(default_factory=list)  # stages of a multi-stage run (stepdistill.recipes)


def did_you_mean(word: object, options, prefix: str = "") -> str:
    """" Did you mean X?" for the option closest to a mistyped word, or ""."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options if o is not None], n=1)
    return f" Did you mean {prefix}{close[0]}?" if close else ""
