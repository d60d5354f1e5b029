"""Shipped SD-scale presets at the real network size (random weights, perf/arch.py) and a small resolution, on CPU.

  python eval/fullsize.py planner --out runs/fullsize     the planner vs the measured peak (perf/planner_check.py)
  python eval/fullsize.py presets --out runs/fullsize     every preset: train, interrupt, resume, export, reload
  stepdistill bench --preset fullsize --out runs/fullsize the presets, as the command
  (add --only NAME ... to run some; --budget-gib caps the memory a run may plan for)

Memory is measured as the peak of live tensor storage bytes (stepdistill.perf.measure) over real training steps;
the planner (stepdistill.perf.memory) is asked for the same config, device and options. Each item runs in a child
process of its own, so one item's memory is not the next one's.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stepdistill.perf.planner_check import PLANNER_CASES, TEXT_ENCODERS, planner_case, planner_table

GiB = 2**30
# every shipped SD-scale preset (stepdistill/presets/ without the digits / gmm worlds), in the order they run
PRESETS = ["dmd2_sd15", "lcm_sd15", "regression_sd15", "sid_sd15", "snoopi_sd15", "boot_sd15", "instaflow_sd15",
           "swiftbrush_sd21", "tscd_sd15", "msd_sd15", "msd_sd15_smaller", "dmd2_sdxl_1step", "regression_sdxl",
           "lcm_lora_sdxl", "dmd2_sdxl_4step", "dmd2_sdxl_1step_warm", "mlcm_sdxl", "dmd2_pixart", "snoopi_pixart",
           "reflow_sd3", "dmd2_flux", "lcm_lora_flux"]
# memory option sets, smallest change first; a preset runs with the first one the planner fits in the budget
LADDER = [
    ("as configured", []),
    ("LoRA generator", ["student.kind=lora"]),
    ("LoRA generator + shared-base critic", ["student.kind=lora", "objective.critic=shared_base"]),
    ("LoRA generator + shared-base critic + bf16 teacher",
     ["student.kind=lora", "objective.critic=shared_base", "teacher.dtype=bf16"]),
]
PROMPT = "a photograph of an astronaut riding a horse"


def random_pipeline(model: str, root: Path) -> Path:
    """A random-weight pipeline of `model` saved once under `root` (fp32 safetensors): presets load it through
    teacher.path, as a user's local folder."""
    folder = root / f"{model}-{TEXT_ENCODERS.get(model, 'reduced')}"
    if not (folder / "model_index.json").is_file():
        import torch

        from stepdistill.perf.arch import build_real_pipeline

        torch.manual_seed(0)
        pipe = build_real_pipeline(model, TEXT_ENCODERS.get(model, "reduced"))
        pipe.save_pretrained(str(folder.with_suffix(".tmp")))
        folder.with_suffix(".tmp").rename(folder)
    return folder


def image_folder(root: Path, n: int = 4) -> Path:
    """Real-image stand-ins (64 px noise with captions) for the presets with a GAN or score-matching stage."""
    folder = root / "images"
    if not (folder / "metadata.jsonl").is_file():
        import numpy as np
        from PIL import Image

        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        rows = []
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            rows.append(json.dumps({"file_name": f"{i}.png", "text": PROMPT}))
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def small_tree(preset: str, option_keys: list[str], teacher_path: Path, images: Path, out_dir: Path) -> dict:
    """The preset's config tree at 64 px, batch 1, two steps per stage (every optimizer phase twice: DMD2-style
    critic_updates set to 1), a checkpoint every step, one-pair caches of 2-step teachers, on `teacher_path`."""
    from stepdistill.config import load_config_tree

    tree = load_config_tree(preset, [*option_keys, f"teacher.path={teacher_path}", "data.resolution=64",
                                     "train.batch_size=1", "train.max_steps=2", "train.checkpoint_every=1",
                                     "train.validate_every=0", "train.report_to=none", "train.progress=false",
                                     "train.mixed_precision='no'", "train.gradient_checkpointing=false",
                                     f"train.output_dir={out_dir}"])

    def shrink(section: dict) -> None:
        if "critic_updates" in section:
            section["critic_updates"] = 1
        if isinstance(section.get("pairs"), dict):
            section["pairs"].update(num=1, steps=2)
            section["pairs"].pop("dir", None)

    shrink(tree["objective"])
    if tree.get("data", {}).get("image_dir") is not None or tree["objective"].get("real_data") == "images":
        tree["data"]["image_dir"] = str(images)
    for stage in tree.get("recipe") or []:
        if stage.get("route"):
            continue
        stage.setdefault("set", {})
        flat = {**stage["set"]}
        if isinstance(flat.get("objective"), dict):
            shrink(flat["objective"])
        if isinstance(flat.get("objective.pairs"), dict):
            flat["objective.pairs"] = {**flat["objective.pairs"], "num": 1, "steps": 2}
            flat["objective.pairs"].pop("dir", None)
        if flat.get("objective.critic_updates"):
            flat["objective.critic_updates"] = 1
        flat["train.max_steps"] = 2
        stage["set"] = flat
    return tree


def choose_options(preset: str, model: str, root: Path, budget_gib: float) -> tuple[str, list[str], list[dict]]:
    """The first option set of LADDER the planner fits in `budget_gib` for this preset at 64 px on CPU (fp32
    unless the set says otherwise), with every estimate made on the way."""
    from stepdistill.config import ConfigError, config_from_dict, load_config_tree
    from stepdistill.objectives import objective_class
    from stepdistill.perf.memory import build_meta_objective, estimate, with_overrides

    tried = []
    for name, keys in LADDER:
        tree = load_config_tree(preset, [*keys, "data.resolution=64", "train.batch_size=1"])
        if "critic" not in tree["objective"] and "critic=" in " ".join(keys):
            continue
        try:
            cfg = config_from_dict({**tree, "recipe": []})  # the first stage's objective
        except ConfigError as e:  # an option this objective does not take
            tried.append({"option": name, "error": str(e)[:200]})
            continue
        cfg.teacher.dtype = "bf16" if "teacher.dtype=bf16" in keys else "fp32"
        cfg.train.mixed_precision = "no"
        cfg = with_overrides(cfg, objective_class(cfg.objective.name).plan_hints(cfg).meta_overrides)
        est = estimate(build_meta_objective(cfg, model, TEXT_ENCODERS.get(model, "reduced"), "cpu"), 1, "no",
                       ema=cfg.train.ema_decay > 0, device_type="cpu")
        tried.append({"option": name, "plan_gib": est.total / GiB})
        if est.total <= budget_gib * GiB:
            return name, keys, tried
    return "none fits", LADDER[-1][1], tried


class _Probe:
    """A trainer hook: times each training step and measures its peak of live tensor memory, counted from what the
    trainer holds as the step starts (`training_tensors`: weights, optimizer states, EMA; as the planner check
    does), so an earlier launch's leftovers, checkpoint writes and the export stay out of it; and asks the first
    launch to stop after its first step (the trainer's SIGTERM path: checkpoint, then stop)."""

    def __init__(self) -> None:
        self.launches, self.step_s, self.params = 0, [], {}
        self.launch_peaks: list[int] = []  # per launch: the peak over its training steps

    @property
    def train_peak(self) -> int:
        return max(self.launch_peaks, default=0)

    def __call__(self):
        return self

    def on_train_start(self, trainer) -> None:
        import gc

        import torch

        from stepdistill.perf.measure import LiveTensorMemory, training_tensors

        gc.collect()  # the first launch's trainer, if a reference cycle still holds it
        self.launches += 1
        self.launch_peaks.append(0)
        objective = trainer.objective
        trainable = {p.untyped_storage()._cdata: p.numel() for p in objective.parameters() if p.requires_grad}
        pipe_modules = [m for m in objective.teacher.pipe.components.values() if isinstance(m, torch.nn.Module)]
        frozen = {p.untyped_storage()._cdata: p.numel() for m in [objective, *pipe_modules] for p in m.parameters()
                  if p.untyped_storage()._cdata not in trainable}
        self.params = {"trainable": sum(trainable.values()), "frozen": sum(frozen.values())}
        step = trainer.train_step

        def measured_step(batch):
            started = time.perf_counter()
            with LiveTensorMemory(alive=training_tensors(trainer)) as memory:
                logs = step(batch)
            self.launch_peaks[-1] = max(self.launch_peaks[-1], memory.peak)
            self.step_s.append(time.perf_counter() - started)
            return logs

        trainer.train_step = measured_step

    def on_step_end(self, trainer, logs) -> None:
        import signal

        if self.launches == 1 and trainer.step == 1:
            trainer._signal = signal.SIGTERM

    def on_checkpoint_written(self, trainer, folder) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass


def _launch(tree: dict) -> None:
    """One `stepdistill train` of the tree, as the command runs it (a stop by the probe's signal is expected)."""
    from stepdistill.config import config_from_dict
    from stepdistill.errors import Stopped
    from stepdistill.recipes import train_recipe
    from stepdistill.training import run_training

    try:
        if tree.get("recipe"):
            train_recipe(tree)
        else:
            run_training(config_from_dict(tree))
    except Stopped:
        pass


def train_twice(tree: dict, out_dir: Path) -> tuple[_Probe, list[str]]:
    """Two launches of `tree` under the probe: the first stopped after step 1's checkpoint, the second resumed (a
    recipe resumes each stage from its own folder); the probe and the checkpoints the first one left."""
    from stepdistill.training import DEFAULT_HOOKS

    probe = _Probe()
    DEFAULT_HOOKS.append(probe)
    try:
        _launch(tree)
        stopped_at = sorted(p.name for p in out_dir.rglob("checkpoint-*") if p.is_dir())
        _launch(tree if tree.get("recipe") else {**tree, "train": {**tree["train"], "resume": "latest"}})
    finally:
        DEFAULT_HOOKS.remove(probe)
    return probe, stopped_at


def sample_export(folder: Path) -> dict:
    """Reload an export with plain diffusers and sample one image with its recipe (stepdistill.json's
    pipeline_kwargs): image size and backbone calls; and the step count a bare `pipe(prompt)` would take."""
    import inspect

    import torch
    from diffusers import DiffusionPipeline

    recipe = json.loads((folder / "stepdistill.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    backbone = getattr(pipe, "unet", None) or pipe.transformer
    calls = []
    handle = backbone.register_forward_hook(lambda *a: calls.append(1))
    started = time.perf_counter()
    with torch.no_grad():
        image = pipe(PROMPT, **recipe["pipeline_kwargs"]).images[0]
    handle.remove()
    default_steps = inspect.signature(pipe.__call__).parameters["num_inference_steps"].default
    return {"pipeline": type(pipe).__name__, "image_size": list(image.size), "backbone_calls": len(calls),
            "recipe_steps": recipe.get("num_inference_steps"), "pipeline_kwargs": recipe["pipeline_kwargs"],
            "bare_call_steps": default_steps, "sample_s": time.perf_counter() - started}


def preset_case(preset: str, root: Path, budget_gib: float) -> dict:
    """One preset end to end: options, two launches (stopped after step 1, then resumed), export reload."""
    from stepdistill.config import config_from_dict, load_config_tree
    from stepdistill.perf.memory import model_of

    base = load_config_tree(preset)
    model = model_of(config_from_dict({**base, "recipe": []}))
    option, keys, tried = choose_options(preset, model, root, budget_gib)
    row = {"preset": preset, "model": model, "text_encoders": TEXT_ENCODERS.get(model, "reduced"),
           "option": option, "set": keys, "plan": tried}
    out_dir = root / "runs" / preset
    tree = small_tree(preset, keys, random_pipeline(model, root / "pipelines"), image_folder(root), out_dir)
    probe, stopped_at = train_twice(tree, out_dir)
    exports = sorted(out_dir.rglob("final/stepdistill.json"), key=lambda p: p.stat().st_mtime)
    row.update(launches=probe.launches, checkpoints=stopped_at, params=probe.params,
               seconds_per_iteration=sorted(probe.step_s)[len(probe.step_s) // 2] if probe.step_s else None,
               measured_gib=probe.train_peak / GiB, plan_gib=tried[-1].get("plan_gib"))
    if not exports:
        row["status"] = "no export written"
        return row
    row["sample"] = sample_export(exports[-1].parent)
    row["status"] = "ran" if option == "as configured" else f"ran with: {option}"
    return row


def run_child(args: list[str], timeout: float) -> dict:
    """One item in a child process; its JSON result, or the error it ended with."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        proc = subprocess.Popen([sys.executable, "-m", "stepdistill.perf.fullsize", *args, "--result", f.name], 
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return {"status": f"not finished in {timeout:.0f} s"}
        if proc.returncode != 0:
            lines = [line for line in out.splitlines() if line.strip()]
            errors = [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b", line)]
            return {"status": f"failed (exit {proc.returncode}): {(errors or lines or [''])[-1][:400]}"}
        return json.loads(Path(f.name).read_text())


def presets_table(rows: list[dict]) -> str:
    lines = [("| preset | model (text encoders) | options needed (<= budget) | trainable / frozen params | "
              "s / iteration | measured peak GiB | planner GiB | resume | export reloaded with plain diffusers | "
              "status |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        params = r.get("params") or {}
        p = f"{params['trainable'] / 1e6:.0f}M / {params['frozen'] / 1e6:.0f}M" if params else "-"
        sample = r.get("sample") or {}
        s = (f"{sample['pipeline']}, {sample['image_size'][0]}x{sample['image_size'][1]}, {sample['backbone_calls']} "
             f"backbone calls with the recipe ({sample['recipe_steps']} steps); bare `pipe(prompt)`: "
             f"{sample['bare_call_steps']} steps") if sample else "-"
        resume = f"stopped at {', '.join(r['checkpoints'])}; resumed" if r.get("checkpoints") else "-"
        measured, planned = (f"{r[k]:.2f}" if isinstance(r.get(k), float) else "-" for k in ("measured_gib", "plan_gib"))
        speed = f"{r['seconds_per_iteration']:.0f}" if r.get("seconds_per_iteration") else "-"
        lines.append(f"| {r['preset']} | {r.get('model', '-')} ({r.get('text_encoders', '-')}) | {r.get('option', '-')} "
                     f"| {p} | {speed} | {measured} | {planned} | {resume} | {s} | "
                     f"{r.get('status', '-')} |")
    return "\n".join(lines)


def bench(out: Path) -> dict:
    """`stepdistill bench --preset fullsize`: every preset (presets.json / presets.md in `out`)."""
    main(["presets", "--out", str(out)])
    return {"json": str(out / "presets.json"), "table": str(out / "presets.md")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["planner", "presets", "planner-case", "preset-case"])
    parser.add_argument("--out", default="runs/fullsize")
    parser.add_argument("--only", nargs="*", default=None, help="planner case numbers or preset names to run")
    parser.add_argument("--budget-gib", type=float, default=15.0, help="memory one run may plan for")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="per item")
    parser.add_argument("--work", default=None, help="folder for random pipelines and runs (default: a temporary one)")
    parser.add_argument("--case", default=None)
    parser.add_argument("--result", default=None)
    args = parser.parse_args(argv)
    if args.what in ("planner-case", "preset-case"):
        if args.what == "planner-case":
            name, preset, model, overrides = PLANNER_CASES[int(args.case)]
            row = {"name": name, **planner_case(preset, model, overrides, args.budget_gib)}
        else:
            row = preset_case(args.case, Path(args.work), args.budget_gib)
        Path(args.result).write_text(json.dumps(row, indent=2, default=str))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.what == "planner":
        items = [str(i) for i in range(len(PLANNER_CASES))] if args.only is None else args.only
    else:
        items = PRESETS if args.only is None else args.only
    work = Path(args.work or tempfile.mkdtemp(prefix="fullsize-"))
    for item in items:
        case = "planner-case" if args.what == "planner" else "preset-case"
        child = [case, "--case", item, "--budget-gib", str(args.budget_gib), "--work", str(work)]
        row = run_child(child, args.timeout_s)
        row.setdefault("name", PLANNER_CASES[int(item)][0] if args.what == "planner" else item)
        row.setdefault("preset", item)
        rows.append(row)
        print(json.dumps(row, default=str)[:800], flush=True)
        (out / f"{args.what}.json").write_text(json.dumps(rows, indent=2, default=str))
    table = planner_table(rows) if args.what == "planner" else presets_table(rows)
    (out / f"{args.what}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
