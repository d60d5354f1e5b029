"""Per-GPU memory planner: weights, gradients, optimizer states and activations of a training config, estimated
without allocating anything (the objective is built on the meta device and its trainable backbones are traced
there), and a recommendation of options that make it fit a GPU of a given size."""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from stepdistill.config import Config, config_from_dict, config_to_dict, parse_overrides
from stepdistill.objectives import Objective, build_objective, objective_class
from stepdistill.objectives.base import get_module
from stepdistill.training.options import enable_gradient_checkpointing, teacher_offload_refusal

GiB = 2**30
# Optimizer state bytes per trainable parameter by train.optimizer: AdamW's exp_avg + exp_avg_sq in fp32; bitsandbytes'
# AdamW8bit keeps both in 8 bits (it leaves tensors under 4096 elements in fp32: biases and norms, a small share).
OPTIMIZER_BYTES = {"adamw": 8, "adamw_fused": 8, "adamw_8bit": 2}
HEADROOM = 0.9  # fraction of the card a plan may fill (allocator fragmentation, cuBLAS/cuDNN workspaces)


def storage_bytes(tensors: Iterator[Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (shared weights counted once; works on meta tensors)."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s._cdata] = s.nbytes()
    return sum(seen.values())


class _FlashAttention(torch.autograd.Function):
    """Stands in for SDPA during a meta trace: saves what flash / memory-efficient attention keeps for backward
    (q, k, v, out, fp32 log-sum-exp), not the L x L matrix that the meta (math) path would."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, *_ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _flash_attention(*args: Tensor, **kwargs) -> Tensor:
    """SDPA's signature (q, k, v positional or as query=/key=/value=, as diffusers' attention dispatch passes
    them) onto _FlashAttention."""
    q, k, v = [*args, *(kwargs[n] for n in ("query", "key", "value") if n in kwargs)][:3]
    return _FlashAttention.apply(q, k, v)


class _Autocast(TorchFunctionMode):
    """CUDA bf16 autocast's main rules, emulated where autocast does not run (meta tensors): matmuls and
    convolutions in bf16, normalizations in fp32; the weight casts autocast caches are counted too."""

    LOW = {F.linear, F.conv2d, torch.matmul, torch.bmm, torch.baddbmm, torch.Tensor.matmul, torch.addmm}
    FP32 = {F.group_norm, F.layer_norm, torch.softmax, F.softmax}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = torch.bfloat16 if func in self.LOW else torch.float32 if func in self.FP32 else None
        if dtype is not None:
            def cast(a):
                return a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a
            args = tuple(cast(a) for a in args)
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextmanager
def count_saved(exclude: list[nn.Module]) -> Iterator[dict[int, int]]:
    """Collects the storages autograd saves for backward (parameters of `exclude` left out): the activations."""
    params = {p.untyped_storage()._cdata for m in exclude for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s._cdata not in params:
            seen[s._cdata] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


@dataclass
class MemoryEstimate:
    """Bytes per GPU; `activations` is the largest phase's, `grads` the largest optimizer group's (the trainer
    frees gradients after each phase)."""

    weights: int
    grads: int
    optimizer: int
    activations: int
    ema: int = 0  # the generator's EMA copy (train.ema_decay > 0)
    step_transient: int = 0  # the optimizer step's temporaries; they live after backward freed the activations
    by_module: dict[str, int] = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.ema + self.grads + self.optimizer + max(self.activations, self.step_transient)

    def as_dict(self) -> dict:
        gib = {k: round(getattr(self, k) / GiB, 3)
               for k in ("weights", "ema", "grads", "optimizer", "activations", "step_transient")}
        return {**gib, "total": round(self.total / GiB, 3), "unit": "GiB",
                "by_module": {k: round(v / GiB, 3) for k, v in self.by_module.items()}, "options": self.options}


def trainable_modules(objective: Objective) -> dict[str, nn.Module]:
    return {g.name: get_module(objective, g.module) for g in objective.optimizer_groups()}


def phase_forward(objective: Objective, phase: str, batch_size: int, device: torch.device) -> Callable[[], Tensor]:
    """The forward with gradient that a phase backpropagates through (the objective's `trace_phase`)."""
    x = torch.randn((batch_size, *objective.teacher.sample_shape), device=device)
    t = torch.full((batch_size,), 500.0, device=device)
    cond = condition_like(objective, batch_size, device)
    return lambda: objective.trace_phase(phase, x, t, cond)


def condition_like(objective: Objective, batch_size: int, device: torch.device):
    """Conditioning fields of the teacher's shapes, batch `batch_size`, on `device` (no text encoder runs)."""
    from stepdistill.teachers.base import Cond

    fields = objective.teacher.fields_like(batch_size, device)
    return Cond(fields, fields, batch_size)


def saved_activation_bytes(objective: Objective, phase: str, batch_size: int, mixed_precision: str) -> int:
    """Activations kept for backward by `phase`'s forward at `batch_size` (traced on the objective's device)."""
    device = objective.device
    forward = phase_forward(objective, phase, batch_size, device)
    modules = list(trainable_modules(objective).values()) + [objective.generator.backbone]
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_attention
    try:
        with count_saved(modules) as seen, (_Autocast() if mixed_precision == "bf16" else _null()):
            forward()
    finally:
        F.scaled_dot_product_attention = original
    return sum(seen.values())


@contextmanager
def _null() -> Iterator[None]:
    yield


def optimizer_step_transient(optimizer: str, params: list[int], device_type: str) -> int:
    """Bytes of the temporaries an optimizer step allocates for a group of parameters (numels `params`). torch's
    AdamW takes its multi-tensor (foreach) path on CUDA, whose `_foreach_sqrt(exp_avg_sqs)` is one fp32 copy of the
    whole group; the single-tensor path (CPU) holds two of one parameter's size (sqrt, then the division);
    fused and 8-bit kernels update in place."""
    if optimizer != "adamw" or not params:
        return 0
    return 4 * sum(params) if device_type == "cuda" else 8 * max(params)


def estimate(objective: Objective, batch_size: int, mixed_precision: str = "bf16",
             gradient_checkpointing: bool = False, optimizer: str = "adamw", shards: int = 1,
             teacher_offload: bool = False, ema: bool = False, device_type: str = "cuda") -> MemoryEstimate:
    """Memory of training `objective` at `batch_size` per GPU with `optimizer` (a train.optimizer choice). With
    `shards` > 1 (FSDP full shard) trainable weights, gradients and optimizer states are divided among the GPUs.
    With `teacher_offload` (teacher.offload) the teacher's backbone weights live in CPU memory: 0 bytes here (the
    one submodule streamed in at a time is left out). `ema` (train.ema_decay > 0) adds the generator's fp32 EMA
    copy; `device_type` selects the optimizer's code path (its step temporaries)."""
    if optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"optimizer {optimizer!r} is not one of {sorted(OPTIMIZER_BYTES)}")
    if teacher_offload and not separate_teacher(objective):
        raise ValueError("teacher_offload: this objective's teacher backbone is shared with a trained network")
    modules = trainable_modules(objective)
    if gradient_checkpointing:
        enable_gradient_checkpointing(objective)  # the trainer's own: every trained diffusers model
        for m in modules.values():
            m.train()
    trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in modules.items()}
    teacher_parts = {f"teacher.{k}": v for k, v in objective.teacher.pipe.components.items()
                     if isinstance(v, nn.Module) and v is not objective.teacher.backbone}
    teacher_parts["teacher.backbone"] = objective.teacher.backbone
    by_module = {k: storage_bytes(m.parameters()) for k, m in teacher_parts.items()}
    # a module the objective shares with the teacher (a shared-base critic) is counted once, as the teacher's
    counted = {p.untyped_storage()._cdata for m in teacher_parts.values() for p in m.parameters()}
    own = storage_bytes(t for t in [*objective.parameters(), *objective.buffers()]
                        if t.untyped_storage()._cdata not in counted)
    by_module["objective (students, critics, targets)"] = own
    if teacher_offload:
        by_module["teacher.backbone"] = 0
    weights = sum(by_module.values())
    sharded = sum(4 * n for n in trainable.values()) * (1 - 1 / shards)
    activations = max(saved_activation_bytes(objective, name, batch_size, mixed_precision) for name in modules)
    sizes = {name: [p.numel() for p in m.parameters() if p.requires_grad] for name, m in modules.items()}
    transient = max(optimizer_step_transient(optimizer, n, device_type) for n in sizes.values())
    return MemoryEstimate(
        weights=int(weights - sharded), grads=max(4 * n for n in trainable.values()) // shards,
        optimizer=sum(OPTIMIZER_BYTES[optimizer] * n for n in trainable.values()) // shards, activations=activations,
        ema=4 * sum(p.numel() for p in objective.generator.backbone.parameters() if p.requires_grad) // shards
        if ema else 0, step_transient=transient // shards,
        by_module=by_module,
        options={"batch_size": batch_size, "mixed_precision": mixed_precision, "optimizer": optimizer,
                 "gradient_checkpointing": gradient_checkpointing, "fsdp_shards": shards,
                 "teacher_offload": teacher_offload, "ema": ema, "device": device_type,
                 "trainable_params": trainable})


def separate_teacher(objective: Objective) -> bool:
    """Whether the teacher's backbone is a frozen module of its own (teacher.offload can move it to CPU), not
    shared with a trained network (a shared-base critic, consistency's teacher_net=lora_base)."""
    backbone = objective.teacher.backbone
    trained = {p.untyped_storage()._cdata for p in objective.parameters() if p.requires_grad}
    return not any(p.requires_grad or p.untyped_storage()._cdata in trained for p in backbone.parameters())


def model_of(cfg: Config) -> str | None:
    """The real architecture (perf.arch.REAL_MODELS) of the config's teacher: the asset whose hub ids hold
    teacher.path (SD2.1 768-v or 512-base, PixArt 1024 or 512, Flux.1 dev or schnell), else teacher.kind's."""
    from stepdistill.perf.arch import model_for

    return model_for(cfg.teacher.kind, cfg.teacher.path)


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A copy of `cfg` with dotted overrides applied (validated like any config)."""
    tree = config_to_dict(cfg)
    for key, value in parse_overrides(overrides):
        section, *rest = key.split(".")
        node = tree[section]
        for part in rest[:-1]:
            node = node[part]
        node[rest[-1]] = value
    return config_from_dict(tree)


def build_meta_objective(cfg: Config, model: str | None = None, text_encoders: str = "full",
                         device_type: str = "cuda") -> Objective:
    """The config's objective with a random-architecture teacher (`model`, default from the config: model_of) on
    the meta device: shapes and dtypes of everything, no memory. teacher.dtype=auto is bf16 on a GPU, fp32 on the
    CPU (`device_type`), as the loader; `text_encoders` as perf.arch.build_real_pipeline."""
    from stepdistill.perf.arch import KIND_DEFAULT, MODELS, build_teacher
    from stepdistill.teachers.base import apply_data_shape

    model = model or model_of(cfg)
    if model is None:
        raise ValueError(f"plan knows the architectures of teacher.kind {sorted(KIND_DEFAULT)}, got "
                         f"{cfg.teacher.kind!r}: pass --model, one of {', '.join(MODELS)}")
    fp32 = cfg.teacher.dtype == "fp32" or (cfg.teacher.dtype == "auto" and device_type == "cpu")
    teacher_dtype = torch.float32 if fp32 else torch.float16 if cfg.teacher.dtype == "fp16" else torch.bfloat16
    meta_cfg = with_overrides(cfg, objective_class(cfg.objective.name).plan_hints(cfg).meta_overrides)
    with torch.device("meta"):
        teacher = build_teacher(model, "meta", teacher_dtype, text_encoders)
        apply_data_shape(teacher, cfg.data)  # build_objective applies it only to a teacher it loads itself
        return build_objective(meta_cfg, "meta", teacher=teacher, prompts=["a"])


def plan(cfg: Config, gpu_gib: float, model: str | None = None, bitsandbytes: bool | None = None,
         max_shards: int = 8, num_gpus: int = 1) -> dict:
    """Estimates for the config as written (its train.optimizer's state bytes included), then the first option
    set (in order of cost to speed or quality) that fits `gpu_gib`: gradient checkpointing, 8-bit AdamW
    (train.optimizer=adamw_8bit, suggested with an install hint where bitsandbytes is missing), then on top of
    that the teacher's backbone in CPU memory where it is a separate frozen copy (teacher.offload=true), for DMD2
    a LoRA critic sharing the teacher's backbone, a LoRA generator, FSDP over 2..max_shards GPUs. Each row lists
    the config keys to `set`. With `num_gpus` > 1 every row is per GPU under FSDP full shard over that many."""
    if bitsandbytes is None:
        try:
            import bitsandbytes

            bitsandbytes = True
        except ImportError:
            bitsandbytes = False
    mp = "no" if cfg.train.mixed_precision == "no" else "bf16"
    t = cfg.train
    base = {"gradient_checkpointing": t.gradient_checkpointing, "optimizer": t.optimizer,
            "teacher_offload": cfg.teacher.offload, "ema": t.ema_decay > 0, "shards": num_gpus}
    ckpt = {**base, "gradient_checkpointing": True}
    set_ckpt = ["train.gradient_checkpointing=true"]
    candidates: list[tuple[str, Config, dict, list[str]]] = [  # (name, config, estimate options, keys to set)
        ("as configured", cfg, base, []),
        ("gradient checkpointing", cfg, ckpt, set_ckpt),
    ]
    ladder = ("gradient checkpointing", "", ckpt, set_ckpt)  # (name, note, options, keys) the offload rung adds to
    if t.optimizer != "adamw_8bit":  # a quarter of AdamW's state bytes
        needs = "" if bitsandbytes else " (needs pip install bitsandbytes)"
        ladder = ("gradient checkpointing + 8-bit AdamW", needs, {**ckpt, "optimizer": "adamw_8bit"},
                  set_ckpt + ["train.optimizer=adamw_8bit"])
        candidates.append((ladder[0] + needs, cfg, ladder[2], ladder[3]))
    if not cfg.teacher.offload and teacher_offload_refusal(cfg) is None:  # on top of the rung before: speed, not quality
        offload = copy.deepcopy(cfg)
        offload.teacher.offload = True
        name, note, options, keys = ladder
        candidates.append((f"{name} + teacher offload{note}", offload, {**options, "teacher_offload": True},
                           keys + ["teacher.offload=true"]))
    for name, keys in objective_class(cfg.objective.name).plan_hints(cfg).rungs:  # the objective's own savings
        candidates.append((f"gradient checkpointing + {name}", with_overrides(cfg, keys), ckpt, set_ckpt + keys))
    if cfg.student.kind != "lora":
        lora = copy.deepcopy(cfg)
        lora.student.kind = "lora"
        candidates.append(("gradient checkpointing + LoRA generator", lora, ckpt, set_ckpt + ["student.kind=lora"]))
    candidates += [(f"gradient checkpointing + FSDP over {n} GPUs (configs/accelerate/fsdp.yaml)", cfg,
                    {**ckpt, "shards": n}, set_ckpt) for n in (2, 4, 8) if n <= max_shards and num_gpus == 1]
    budget = gpu_gib * GiB * HEADROOM
    rows, recommendation = [], None
    for name, c, options, keys in candidates:
        est = estimate(build_meta_objective(c, model), t.batch_size, mp, **options)
        fits = est.total <= budget
        rows.append({"option": name, "fits": fits, "set": keys, **est.as_dict()})
        if fits:
            recommendation = name
            break
    return {"gpu_gib": gpu_gib, "num_gpus": num_gpus, "headroom": HEADROOM, "bitsandbytes": bitsandbytes,
            "estimates": rows,
            "recommendation": recommendation or "does not fit: lower train.batch_size"}
