"""The digits benchmark: every landed objective distills the shipped digits teacher into a one-step student with the
same budget (generator-side training steps and batch) and seeds, then all are scored like the demo (prompt
accuracy, digits FID vs the teacher's 50-step samples and vs real test digits, images/s) next to the teacher at
1 and 4 DDIM steps. Writes <out>/benchmark.json and the table of BENCHMARKS.md.

    python eval/benchmark.py --out runs/benchmark --markdown BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from stepdistill import digits
from stepdistill.demo import DEMO_CONFIG, run_distillation
from stepdistill.metrics.digits import REFERENCE_NAME, TEACHER_GUIDANCE, digits_reference, evaluate_digits
from stepdistill.pipelines.export import load_exported

# objective overrides on top of the demo config (teacher, student at t = 999, batch, seed); all at the same
# number of steps except where a method updates its generator once every critic_updates steps (DMD2: the step
# count is doubled so that the generator gets the same number of updates).
METHODS = {
    "regression (DMD L_reg / rectified-flow distillation)": [
        "objective.name=regression", "objective.lr=1e-4", "objective.num_pairs=1000", "objective.teacher_steps=20",
        "objective.guidance=3.0", "objective.loss=l2"],
    "consistency (LCM, data-free)": [
        "objective.name=consistency", "objective.lr=1e-4", "objective.data=teacher", "objective.num_pairs=1000",
        "objective.pair_steps=20", "objective.pair_guidance=3.0", "objective.w_min=0", "objective.w_max=0",
        "objective.loss=l2"],
    "DMD2 (no GAN)": [],
    "DMD2 + GAN on real digits": ["objective.real_data={real}", "objective.gan_generator_weight=3e-3",
                                  "objective.gan_critic_weight=1e-2"],
}


def real_latents(path: Path) -> Path:
    """The train digits encoded by the teacher's VAE (latent means x scaling factor), the GAN's real data."""
    pipe = digits.load_digits_pipeline()
    images, _ = digits.load_digit_images("train")
    with torch.no_grad():
        latents = pipe.vae.encode(images * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.contiguous()}, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/benchmark")
    parser.add_argument("--generator-steps", type=int, default=150, help="generator updates per method")
    parser.add_argument("--per-digit", type=int, default=50)
    parser.add_argument("--markdown", default="")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    args = parser.parse_args()
    out = Path(args.out)
    teacher = digits.load_digits_pipeline()
    reference = digits_reference(teacher, digits.TEACHER_DIR / REFERENCE_NAME)
    rows = {}
    for steps in (1, 4):
        rows[f"teacher {steps}-step DDIM (CFG {TEACHER_GUIDANCE:g})"], _ = evaluate_digits(
            teacher, reference, steps, TEACHER_GUIDANCE, args.per_digit)
    real = real_latents(out / "real_latents.safetensors")
    for name in args.methods:
        overrides = [o.format(real=real) for o in METHODS[name]]
        train_steps = args.generator_steps * (2 if name.startswith("DMD2") else 1)  # demo: critic_updates 2
        slug = "".join(c if c.isalnum() else "_" for c in name.lower())[:40]
        start = time.perf_counter()
        _, result = run_distillation(DEMO_CONFIG, overrides + [f"train.max_steps={train_steps}",
                                                              f"train.output_dir={out / slug}", "train.seed=0"])
        seconds = time.perf_counter() - start
        student, recipe = load_exported(result.final_dir)
        student.set_progress_bar_config(disable=True)
        kwargs = {k: v for k, v in recipe["pipeline_kwargs"].items()
                  if k not in ("guidance_scale", "num_inference_steps")}
        rows[name], _ = evaluate_digits(student, reference, recipe["num_inference_steps"], recipe["guidance_scale"],
                                        args.per_digit, **kwargs)
        rows[name].update(train_seconds=round(seconds, 1), train_steps=train_steps)
        print(name, json.dumps(rows[name]), flush=True)
    report = {"rows": rows, "floors": {"fid_teacher_vs_teacher": float(reference["teacher_floor"]),
                                       "fid_real_vs_real": float(reference["real_floor"])},
              "generator_steps": args.generator_steps, "threads": torch.get_num_threads()}
    (out / "benchmark.json").write_text(json.dumps(report, indent=2))
    lines = ["| model | steps | prompt accuracy | FID vs teacher 50-step | FID vs real | images/s | train s |",
             "|---|---|---|---|---|---|---|"]
    for name, m in rows.items():
        lines.append(f"| {name} | {m['steps']} | {m['prompt_accuracy']:.3f} | {m['fid_vs_teacher50']:.2f} | "
                     f"{m['fid_vs_real']:.2f} | {m['images_per_s']:.0f} | {m.get('train_seconds', '')} |")
    lines.append(f"| floors | | | {report['floors']['fid_teacher_vs_teacher']:.2f} | "
                 f"{report['floors']['fid_real_vs_real']:.2f} | | |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(
            "# Benchmarks\n\n## Digits: one-step students of the shipped digits teacher\n\n"
            f"`python eval/benchmark.py --out {args.out} --generator-steps {args.generator_steps} "
            f"--markdown {args.markdown}` (CPU, {report['threads']} threads). Same teacher, student init (a copy "
            f"of its UNet at t = 999), batch, seed and {args.generator_steps} generator updates per method; "
            f"{10 * args.per_digit} samples per row, balanced over the digits; digits FID on the classifier's 64 "
            "pre-activation features.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
