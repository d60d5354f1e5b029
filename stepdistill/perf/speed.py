"""Training-step and sampling benchmarks through the real code paths (Trainer.train_step of each objective; the
student's one-step sampler and the teacher's CFG sampler, VAE decode included), on random-weight SD1.5 / SDXL
architectures (or the tiny pipelines on CPU). Results: JSON plus a markdown table naming the device."""
from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from stepdistill.config import StudentConfig, load_config
from stepdistill.data import DEFAULT_PROMPTS
from stepdistill.objectives import build_objective, objective_class
from stepdistill.objectives.base import get_module
from stepdistill.perf.arch import build_teacher
from stepdistill.perf.memory import with_overrides
from stepdistill.perf.timing import ForwardTimer, device_info, median_time, released, sync
from stepdistill.students import RenoiseGenerator, build_backbone
from stepdistill.training import Trainer

# dense bf16 tensor-core peak of the datasheets (SXM parts), for MFU
OBJECTIVE_CONFIGS = {  # objective -> preset config per architecture family
    "dmd2": {"sd": "dmd2_sd15", "sdxl": "dmd2_sdxl_1step"},
    "lcm": {"sd": "lcm_sd15", "sdxl": "lcm_lora_sdxl"},
    "regression": {"sd": "regression_sd15", "sdxl": "regression_sdxl"},
}


@dataclass
class Preset:
    device: str
    models: list[str]
    train_batch: dict[str, int]
    sample_batch: dict[str, int]
    teacher_steps: list[int]
    guidance: float
    warmup: int
    iters: int
    # model -> options measured one by one (baseline first); each is a config override (OPTION_OVERRIDES)
    train_options: dict[str, list[str]]
    max_batch_search: list[int] = field(default_factory=list)  # DMD2 batch sizes tried on the first model
    compile_sampling: bool = False
    budget_s: float = 1e9  # items that would start after this many seconds are skipped (and say so)


PRESETS = {
    "tiny": Preset(device="cpu", models=["tiny-sd", "tiny-sdxl"], train_batch={"tiny-sd": 2, "tiny-sdxl": 2},
                   sample_batch={"tiny-sd": 4, "tiny-sdxl": 4}, teacher_steps=[2, 4], guidance=7.5, warmup=1,
                   iters=2, train_options={"tiny-sd": ["bf16", "channels_last"], "tiny-sdxl": ["bf16"]}),
    "h100": Preset(device="cuda", models=["sd15", "sdxl"], train_batch={"sd15": 16, "sdxl": 2},
                   sample_batch={"sd15": 32, "sdxl": 8}, teacher_steps=[25, 50], guidance=7.5, warmup=2, iters=5,
                   train_options={"sd15": ["bf16", "fused_adamw", "channels_last", "grad_ckpt", "fp32_tf32",
                                           "compile"],
                                  "sdxl": ["grad_ckpt", "grad_ckpt+lora"]},
                   max_batch_search=[32, 48, 64, 96], compile_sampling=True, budget_s=330),
}


# ---------------------------------------------------------------------------------------------- training
def phase_cycle(objective, horizon: int = 64) -> int:
    """The period of the objective's phase schedule (DMD2's critic_updates), read off its first `horizon` steps."""
    pattern = [tuple(objective.phases(s)) for s in range(horizon)]
    return next(p for p in range(1, horizon) if all(pattern[i] == pattern[i % p] for i in range(horizon)))


def family(model: str) -> str:
    return "sdxl" if "sdxl" in model else "sd"


# Benchmark options as the config keys a user sets ("+" combines them). bf16 is the baseline; fp32_tf32 also
# switches TF32 matmuls on. compile's compilation happens in the preset's warm-up steps, outside the timing.
OPTION_OVERRIDES = {
    "bf16": [], "fp32_tf32": [], "grad_ckpt": ["train.gradient_checkpointing=true"], "lora": ["student.kind=lora"],
    "fused_adamw": ["train.optimizer=adamw_fused"], "adamw_8bit": ["train.optimizer=adamw_8bit"],
    "channels_last": ["train.channels_last=true"], "compile": ["train.compile=true"],
}


def option_overrides(option: str) -> list[str]:
    """The config overrides of a benchmark option such as "grad_ckpt+lora"."""
    out = []
    for part in option.split("+"):
        if part not in OPTION_OVERRIDES:
            raise ValueError(f"benchmark option {part!r} is not one of {sorted(OPTION_OVERRIDES)}")
        out += OPTION_OVERRIDES[part]
    return out


def bench_config(objective: str, model: str, batch: int, option: str, device: torch.device, out_dir: str):
    """The preset config of `objective` with benchmark overrides (no logs, checkpoints or previews; a pair
    cache of one batch from a 1-step teacher, since pair generation is not what is measured; the planner's
    meta-build overrides, e.g. no real data) and the config keys of `option`."""
    mp = "no" if option == "fp32_tf32" or device.type == "cpu" else "bf16"
    overrides = [f"train.output_dir={out_dir}", f"train.batch_size={batch}", "train.report_to=none",
                 "train.checkpoint_every=0", "train.validate_every=0", "train.progress=false", "train.ema_decay=0",
                 f"train.mixed_precision='{mp}'", "train.overwrite=true", "train.gradient_checkpointing=false",
                 *option_overrides(option)]
    cfg = load_config(OBJECTIVE_CONFIGS[objective][family(model)], overrides)
    cfg = with_overrides(cfg, objective_class(cfg.objective.name).plan_hints(cfg).meta_overrides)
    pairs = getattr(cfg.objective, "pairs", None)
    if pairs is not None:
        pairs.num, pairs.steps = batch, 1
    return cfg


def bench_training(objective_name: str, model: str, batch: int, option: str, preset: Preset,
                   device: torch.device, peak_flops: float | None, with_plan: bool) -> dict:
    """Samples/s, MFU, peak memory and forward-time split of each distinct trainer step of the objective."""
    if option == "fp32_tf32":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    with tempfile.TemporaryDirectory() as tmp, released(device):
        cfg = bench_config(objective_name, model, batch, option, device, tmp)
        teacher_dtype = torch.float32 if option == "fp32_tf32" or device.type == "cpu" else torch.bfloat16
        teacher = build_teacher(model, device, teacher_dtype)
        objective = build_objective(cfg, device, teacher=teacher, prompts=DEFAULT_PROMPTS)
        trainer = Trainer(cfg, objective)
        batch_data = next(trainer.batches())
        modules = {g.name: get_module(objective, g.module) for g in objective.optimizer_groups()}
        modules["teacher"] = teacher.backbone
        cycle = phase_cycle(objective)
        kinds: dict[str, int] = {}
        for s in range(cycle):
            kinds.setdefault("+".join(objective.phases(s)), s)

        def step(at: int) -> None:
            trainer.step = at
            trainer.train_step(batch_data)

        steps = []
        for kind, at in kinds.items():
            seconds = median_time(lambda: step(at), device, preset.warmup, preset.iters)  # timed without hooks
            timer = ForwardTimer(modules, device)
            if cfg.train.compile:
                step(at)  # compiled modules recompile for the hooks
            timer.reset()
            step(at)
            sync(device)
            split = timer.seconds()
            timer.close()
            with FlopCounterMode(display=False) as counter:
                step(at)
            flops = counter.get_total_flops()
            steps.append({"phases": kind, "share_of_steps": sum("+".join(objective.phases(s)) == kind
                                                                  for s in range(cycle)) / cycle,
                          "step_s": seconds, "samples_per_s": batch / seconds, "tflop_per_step": flops / 1e12,
                          "mfu": flops / seconds / peak_flops if peak_flops else None,
                          "forward_s": {k: round(v, 5) for k, v in split.items()}})
        mean_step = sum(s["step_s"] * s["share_of_steps"] for s in steps)
        row = {"objective": objective_name, "model": model, "batch": batch, "option": option,
               "mixed_precision": cfg.train.mixed_precision, "teacher_dtype": str(teacher_dtype).split(".")[-1],
               "config": OBJECTIVE_CONFIGS[objective_name][family(model)], "steps": steps,
               "mean_step_s": mean_step, "samples_per_s": batch / mean_step,
               "mfu": (sum(s["tflop_per_step"] * s["share_of_steps"] for s in steps) * 1e12 / mean_step / peak_flops
                       if peak_flops else None),
               "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                                   else None)}
        if with_plan:
            from stepdistill.perf.memory import build_meta_objective, estimate

            est = estimate(build_meta_objective(cfg, model), batch, "no" if option == "fp32_tf32" else "bf16",
                           gradient_checkpointing=cfg.train.gradient_checkpointing, optimizer=cfg.train.optimizer)
            row["plan_estimate_gib"] = round(est.total / 2**30, 2)
        del trainer, objective, teacher
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return row


def max_batch(model: str, sizes: list[int], preset: Preset, device: torch.device, deadline: float) -> dict:
    """The largest DMD2 batch (bf16, no checkpointing) whose generator+critic step runs without OOM."""
    fits, tried = None, []
    for n in sizes:
        if time.perf_counter() > deadline:
            break
        tried.append(n)
        try:
            with tempfile.TemporaryDirectory() as tmp, released(device):
                cfg = bench_config("dmd2", model, n, "bf16", device, tmp)
                teacher = build_teacher(model, device, torch.bfloat16)
                objective = build_objective(cfg, device, teacher=teacher, prompts=DEFAULT_PROMPTS)
                trainer = Trainer(cfg, objective)
                trainer.train_step(next(trainer.batches()))
                sync(device)
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                del trainer, objective, teacher
            fits = {"batch": n, "peak_memory_gib": peak}
        except torch.OutOfMemoryError:
            break
    return {"model": model, "tried": tried, "largest_fitting": fits}


# ---------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def bench_sampling(model: str, preset: Preset, device: torch.device) -> list[dict]:
    """One-step student (UNet + VAE decode) vs the teacher's CFG sampler at each of preset.teacher_steps:
    batch-1 latency and batch-N throughput; prompts are pre-encoded (cached, as in training)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    with released(device):
        teacher = build_teacher(model, device, dtype)
        teacher.pipe.vae.to(dtype)  # bf16 decode for student and teacher alike (SD/SDXL VAEs hold bf16 range)
        generator = RenoiseGenerator(build_backbone(teacher, StudentConfig()), teacher, [999]).to(device, dtype).eval()
        n_big = preset.sample_batch[model]
        conds = {n: teacher.encode([DEFAULT_PROMPTS[0]] * n) for n in (1, n_big)}

        def one_step(n: int) -> torch.Tensor:
            return teacher.decode(generator.sample(torch.randn((n, *teacher.sample_shape), device=device), conds[n]))

        def teacher_run(n: int, steps: int) -> torch.Tensor:
            noise = torch.randn((n, *teacher.sample_shape), device=device)
            return teacher.decode(teacher.sample(noise, conds[n], steps, preset.guidance))

        def record(name: str, steps: int, guidance: float, fn: Callable[[int], object], iters: int) -> None:
            latency = median_time(lambda: fn(1), device, 1, iters)
            batch_s = median_time(lambda: fn(n_big), device, 1 if steps == 1 else 0, 1 if steps > 1 else iters)
            rows.append({"model": model, "sampler": name, "steps": steps, "guidance": guidance,
                         "latency_batch1_s": latency, "batch": n_big, "images_per_s": n_big / batch_s})

        record("student one-step (eager, SDPA)", 1, 1.0, one_step, 2 * preset.iters)
        if device.type == "cuda":
            from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

            generator.backbone.set_attn_processor(AttnProcessor())
            record("student one-step (eager, classic attention)", 1, 1.0, one_step, preset.iters)
            generator.backbone.set_attn_processor(AttnProcessor2_0())
        for steps in preset.teacher_steps:
            record(f"teacher DDIM + CFG {preset.guidance}", steps, preset.guidance, lambda n: teacher_run(n, steps), 1)
        if preset.compile_sampling and model == preset.models[0]:
            generator.backbone = torch.compile(generator.backbone)
            start = time.perf_counter()
            one_step(1)
            sync(device)
            compile_s = time.perf_counter() - start
            latency = median_time(lambda: one_step(1), device, 2, 10)
            rows.append({"model": model, "sampler": "student one-step (torch.compile UNet)", "steps": 1,
                         "guidance": 1.0, "latency_batch1_s": latency, "batch": 1, "images_per_s": 1 / latency,
                         "compile_s": compile_s})
        del generator, teacher
    base = {r["model"]: r["latency_batch1_s"] for r in rows if r["sampler"].startswith("student one-step (eager, S")}
    for r in rows:
        r["speedup_vs_one_step"] = r["latency_batch1_s"] / base[r["model"]]
    return rows


# ---------------------------------------------------------------------------------------------- driver
def run(preset_name: str, objectives: list[str] | None = None) -> dict:
    """The whole measurement of a preset; items past the preset's time budget are listed as skipped and a
    failing item records its error instead of stopping the run."""
    preset = PRESETS[preset_name]
    device = torch.device(preset.device)
    started = time.perf_counter()
    deadline = started + preset.budget_s
    info = device_info(device)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()

    result: dict = {"preset": preset_name, "device": info, "torch": torch.__version__,
                    "diffusers": diffusers.__version__, "training": [], "sampling": [], "max_batch": None,
                    "skipped": [], "errors": []}

    def attempt(what: str, fn: Callable[[], object]) -> object:
        if time.perf_counter() > deadline:
            result["skipped"].append(what)
            return None
        try:
            return fn()
        except Exception as e:  # recorded, so one failing item does not lose the rest of the run
            if device.type == "cuda":
                torch.cuda.empty_cache()
            result["errors"].append({"item": what, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
            return None

    for model in preset.models:
        rows = attempt(f"sampling {model}", lambda: bench_sampling(model, preset, device))
        result["sampling"] += rows or []
        for objective in objectives or list(OBJECTIVE_CONFIGS):
            options = preset.train_options[model]
            for option in options if objective == "dmd2" else options[:1]:
                row = attempt(f"training {objective} {model} {option}", lambda: bench_training(
                    objective, model, preset.train_batch[model], option, preset, device, info["peak_bf16_flops"],
                    with_plan=device.type == "cuda" and option == options[0]))
                if row:
                    result["training"].append(row)
        if preset.max_batch_search and model == preset.models[0]:
            result["max_batch"] = attempt(f"max batch {model}",
                                          lambda: max_batch(model, preset.max_batch_search, preset, device, deadline))
    result["wall_s"] = time.perf_counter() - started
    return result


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown(result: dict) -> str:
    """The result as markdown tables, headed by the device."""
    d = result["device"]
    lines = [f"Device: **{d['name']}**" + (f", {d.get('memory_gib')} GiB, measured bf16 matmul "
                                            f"{d.get('measured_bf16_matmul_tflops')} TFLOP/s" if "memory_gib" in d
                                            else f", {d.get('threads')} threads"),
             f"(torch {result['torch']}, diffusers {result['diffusers']}, preset {result['preset']}, "
             f"{result['wall_s']:.0f} s)", "",
             "| objective | model | batch | option | samples/s | step s (per kind) | MFU | peak GiB | plan GiB | "
             "forward s: generator / critic / teacher |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["training"]:
        kinds = "; ".join(f"{s['phases']} {s['step_s']:.3g}" for s in r["steps"])
        fwd = "; ".join(" / ".join(_fmt(s["forward_s"].get(k)) for k in ("generator", "critic", "teacher"))
                        for s in r["steps"])
        lines.append(f"| {r['objective']} | {r['model']} | {r['batch']} | {r['option']} | {_fmt(r['samples_per_s'])} "
                     f"| {kinds} | {_fmt(r['mfu'])} | {_fmt(r['peak_memory_gib'])} | {_fmt(r.get('plan_estimate_gib'))} "
                     f"| {fwd} |")
    lines += ["", "| model | sampler | steps | latency batch 1 (ms) | images/s (batch) | × one-step latency |",
              "|---|---|---|---|---|---|"]
    for r in result["sampling"]:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['latency_batch1_s'] * 1e3:.1f} | "
                     f"{_fmt(r['images_per_s'])} ({r['batch']}) | {_fmt(r['speedup_vs_one_step'])} |")
    if result["max_batch"]:
        lines += ["", f"Largest DMD2 batch: {result['max_batch']}"]
    for key in ("skipped", "errors"):
        if result[key]:
            lines += ["", f"{key}: {result[key]}"]
    return "\n".join(lines) + "\n"


def run_and_write(preset_name: str, objectives: list[str] | None, out: str | Path, command: str) -> dict:
    """Run the preset, write <out>/speed.json and <out>/speed.md, show the table (stderr); returns where they are.
    Fails (after writing what it measured) when an item failed or nothing was measured."""
    from stepdistill.errors import RunFailed

    result = run(preset_name, objectives)
    result["command"] = command
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "speed.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (folder / "speed.md").write_text(table)
    print(table, file=sys.stderr, flush=True)
    errors = result["errors"]
    if errors or not (result["training"] or result["sampling"]):
        first = f" (first: {errors[0]['item']}: {errors[0]['error']})" if errors else ""
        raise RunFailed(f"bench --preset {preset_name}: {len(errors)} item(s) failed{first}, "
                        f"{len(result['training']) + len(result['sampling'])} row(s) measured; see "
                        f"{folder / 'speed.json'}")
    return {"speed_json": str(folder / "speed.json"), "speed_md": str(folder / "speed.md"),
            "rows": len(result["training"]) + len(result["sampling"]), "skipped": result["skipped"]}
