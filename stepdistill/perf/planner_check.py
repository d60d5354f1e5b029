"""The memory planner held against measurement at the real SD sizes: the peak of live tensor memory
(stepdistill.perf.measure) over real training steps of a random-weight teacher at 64 px on CPU, beside
`stepdistill.perf.memory.estimate` for the same config, device and options, and the planner's answer at the real
resolution and batch on a GPU. Run through `python -m stepdistill.perf.fullsize planner`."""
from __future__ import annotations

import tempfile
import time

GiB = 2**30

# the planner checks: (name, preset, model, config overrides), measured at 64 px, batch 1. SDXL's text encoders
# are the reduced ones (perf/arch.py: real output widths, one layer; 3.3 GB less in fp32), in the planner too.
PLANNER_CASES = [
    ("SD1.5 DMD2, LoRA generator + shared-base critic", "dmd2_sd15", "sd15",
     ["student.kind=lora", "objective.critic=shared_base", "objective.critic_lora_rank=64"]),
    ("SDXL DMD2, LoRA generator + shared-base critic (reduced text encoders)", "dmd2_sdxl_1step", "sdxl",
     ["student.kind=lora", "objective.critic=shared_base", "objective.critic_lora_rank=64"]),
    ("SD1.5 DMD2 full (two trained UNet copies)", "dmd2_sd15", "sd15", []),
    ("SDXL DMD2, LoRA generator, full critic copy (reduced text encoders)", "dmd2_sdxl_1step", "sdxl",
     ["student.kind=lora"]),
]
TEXT_ENCODERS = {"sd15": "full", "sd21": "full"}  # the others: "reduced"
# the real resolution and batch the planner is also asked for (the presets' own batch where it is the paper's)
REAL_SCALE = {"dmd2_sd15": ["data.resolution=512", "train.batch_size=16"],
              "dmd2_sdxl_1step": ["data.resolution=1024", "train.batch_size=2"]}
SMALL = ["data.resolution=64", "train.batch_size=1", "objective.critic_updates=1"]


def cpu_overrides(out_dir: str) -> list[str]:
    """A CPU run as the measurement takes it: fp32 throughout (CPU autocast is another code path), no
    checkpoints, previews or logs."""
    return [f"train.output_dir={out_dir}", "train.mixed_precision='no'", "teacher.dtype=fp32",
            "train.checkpoint_every=0", "train.validate_every=0", "train.report_to=none", "train.progress=false",
            "train.overwrite=true", "train.gradient_checkpointing=false"]


def planner_case(preset: str, model: str, overrides: list[str], budget_gib: float) -> dict:
    """Planner estimates (CPU fp32 at 64 px, and the GPU at the real size), then the measured peak where the
    planner's CPU figure fits `budget_gib`."""
    import torch

    from stepdistill.config import load_config
    from stepdistill.data import DEFAULT_PROMPTS
    from stepdistill.objectives import build_objective, objective_class
    from stepdistill.perf.arch import build_teacher
    from stepdistill.perf.measure import measure_training
    from stepdistill.perf.memory import build_meta_objective, estimate, plan, with_overrides
    from stepdistill.training import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(preset, [*SMALL, *overrides, *cpu_overrides(tmp)])
        cfg = with_overrides(cfg, objective_class(cfg.objective.name).plan_hints(cfg).meta_overrides)
        encoders = TEXT_ENCODERS.get(model, "reduced")
        est = estimate(build_meta_objective(cfg, model, encoders, "cpu"), 1, "no", ema=cfg.train.ema_decay > 0,
                       device_type="cpu")
        real = load_config(preset, [*REAL_SCALE[preset], *overrides])
        row = {"preset": preset, "overrides": overrides, "plan_cpu_64px_gib": est.total / GiB,
               "plan_cpu_parts_gib": est.as_dict(),
               "plan_gpu_real_size": plan(real, 80.0, model, bitsandbytes=False)["estimates"][0]}
        without_states = est.total - est.optimizer - max(est.activations, est.step_transient) + est.activations
        budget = budget_gib * GiB
        if without_states > budget:
            row["measured_gib"] = None
            row["why_not_measured"] = (f"the planner puts it at {est.total / GiB:.1f} GiB in fp32 "
                                       f"({without_states / GiB:.1f} without optimizer states), over the "
                                       f"{budget_gib:g} GiB one process may take here")
            return row
        torch.manual_seed(0)
        started = time.perf_counter()
        teacher = build_teacher(model, "cpu", torch.float32, encoders)
        teacher.set_resolution(64)  # SMALL's data.resolution: build_objective applies it only to a teacher it loads
        objective = build_objective(cfg, "cpu", teacher=teacher, prompts=DEFAULT_PROMPTS)
        trainer = Trainer(cfg, objective)
        row["build_s"] = time.perf_counter() - started
        started = time.perf_counter()
        if est.total <= budget:
            peak = measure_training(trainer, 2)  # both phases twice (critic_updates=1): the optimizer states exist
            row["seconds_per_iteration"] = (time.perf_counter() - started) / 2
            row["measured_gib"] = peak / GiB
            row["plan_over_measured"] = est.total / peak
            return row
        # too big with AdamW's states: every phase's forward and backward measured with real tensors, the states
        # (two fp32 moments per trained parameter, exact by AdamW's definition) counted, not allocated
        peak = measure_phases(trainer)
        states = 8 * sum(p.numel() for p in objective.parameters() if p.requires_grad)
        row["seconds_per_iteration"] = time.perf_counter() - started
        row["measured_fwd_bwd_gib"] = peak / GiB
        row["counted_optimizer_gib"] = states / GiB
        row["measured_gib"] = (peak + states) / GiB
        row["measured_kind"] = "forward/backward measured + AdamW states counted"
        row["plan_over_measured"] = est.total / (peak + states)
        return row


def measure_phases(trainer) -> int:
    """Peak live tensor bytes of each optimizer phase's loss and backward (no optimizer step), gradients freed
    between phases as the trainer frees them."""
    from stepdistill.perf.measure import LiveTensorMemory, training_tensors

    batch = next(trainer.batches())
    trainer.seed_step()
    objective = trainer.objective
    with LiveTensorMemory(alive=training_tensors(trainer)) as m:
        for phase in objective.phases(0):
            objective.loss(phase, batch, 0)["loss"].backward()
            for p in objective.parameters():
                p.grad = None
    return m.peak


def planner_table(rows: list[dict]) -> str:
    lines = [("| configuration (64 px, batch 1, CPU fp32) | measured peak GiB | planner GiB | planner / measured | "
              "s / iteration | planner at the real size (GPU bf16) |"), "|---|---|---|---|---|---|"]
    for r in rows:
        real = r.get("plan_gpu_real_size", {})
        opts = real.get("options", {})
        at_real = (f"{real['total']:.1f} GiB (batch {opts.get('batch_size')}, {real.get('option')})"
                   if real else "")
        measured = (f"{r['measured_gib']:.2f}" if r.get("measured_gib") is not None
                    else f"not measured: {r.get('why_not_measured') or r.get('status')}")
        if r.get("measured_kind"):
            measured += (f" ({r['measured_fwd_bwd_gib']:.2f} measured over forward/backward + "
                         f"{r['counted_optimizer_gib']:.2f} AdamW states counted, not allocated)")
        ratio = f"{r['plan_over_measured']:.3f}" if r.get("plan_over_measured") else "-"
        speed = f"{r['seconds_per_iteration']:.1f}" if r.get("seconds_per_iteration") else "-"
        plan_small = f"{r['plan_cpu_64px_gib']:.2f}" if "plan_cpu_64px_gib" in r else "-"
        lines.append(f"| {r['name']} | {measured} | {plan_small} | {ratio} | {speed} | {at_real} |")
    return "\n".join(lines)
