"""NASA on a one-step digits student: does a negative prompt remove its digit? Unconditional sampling (prompt "")
of an exported student of the shipped digits teacher, with the negative prompt "a handwritten digit <d>" through
NASA (negative-away steer attention, stepdistill.pipelines.nasa) at several alphas, and through diffusers' own
output-space CFG (guidance_scale w, the same negative) for comparison, on the same noise. The digits classifier
reads every sample: the share of digit d, how confidently the samples read as digits at all (mean top-class
probability), and how far they are from the real test digits (FID on the classifier's features, as `stepdistill
eval --preset digits` computes it; every row's FID is over the same number of samples, averaged over the 10
negatives). Writes <out>/nasa.json and <out>/nasa.md.

    python eval/nasa_digits.py <export folder> --out runs/nasa_digits
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from stepdistill.evaluation.fid import frechet_distance, statistics
from stepdistill.evaluation.miniature import features, load_reference
from stepdistill.miniature.classifier import ClassifierFeatures
from stepdistill.miniature.digits import DIGITS as DIGITS_DATASET
from stepdistill.pipelines import load_exported
from stepdistill.pipelines.nasa import nasa_pipeline

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@torch.no_grad()
def read_digits(pipe, model: ClassifierFeatures, real: dict, n: int, seed: int, **kwargs) -> dict:
    """Predicted digit [n], top-class probability [n] and FID vs the real test digits (`real`: the digits reference)
    of n samples of the prompt "" from fixed noise."""
    images = pipe([""] * n, generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).images
    images = images.float().clamp(0, 1)
    probs = model.classifier(model.prepare(images * 255.0)).softmax(dim=1)
    confidence, digit = probs.max(dim=1)
    fid = frechet_distance(*statistics(features(images, model)), real["real_mu"], real["real_sigma"])
    return {"digit": digit, "confidence": confidence, "fid_vs_real": fid}


def summarize(read: dict, target: int) -> dict:
    digit, confidence = read["digit"], read["confidence"]
    return {"share": float((digit == target).float().mean()), "confidence": float(confidence.mean()),
            "confident_share": float((confidence >= 0.9).float().mean()), "fid_vs_real": read["fid_vs_real"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="an exported one-step student of the digits teacher (final/)")
    parser.add_argument("--out", default="runs/nasa_digits")
    parser.add_argument("--samples", type=int, default=500, help="samples per digit and setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nasa-scales", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--cfg-scales", type=float, nargs="+", default=[1.5, 3.0, 5.0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    plain, recipe = load_exported(args.export)
    pipe = nasa_pipeline(plain)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {k: v for k, v in recipe["pipeline_kwargs"].items() if k != "guidance_scale"}
    classifier = ClassifierFeatures(DIGITS_DATASET.classifier_dir).eval()
    real = load_reference(DIGITS_DATASET)
    unguided = read_digits(pipe, classifier, real, args.samples, args.seed, guidance_scale=0.0, **kwargs)
    base = {"histogram": torch.bincount(unguided["digit"], minlength=10).tolist(),
            **{k: v for k, v in summarize(unguided, 0).items() if k != "share"}}
    rows = {}
    for d, name in enumerate(DIGITS):
        negative = [f"a handwritten digit {name}"] * args.samples  # a list, as diffusers wants for a list of prompts
        row = {"none": summarize(unguided, d)}
        for a in args.nasa_scales:
            row[f"NASA alpha={a:g}"] = summarize(read_digits(pipe, classifier, real, args.samples, args.seed,
                                                             negative_prompt=negative, nasa_scale=a,
                                                             guidance_scale=0.0, **kwargs), d)
        for w in args.cfg_scales:
            row[f"CFG w={w:g}"] = summarize(read_digits(pipe, classifier, real, args.samples, args.seed,
                                                        negative_prompt=negative, nasa_scale=0.0, guidance_scale=w,
                                                        **kwargs), d)
        rows[d] = row
        print(d, json.dumps(row), flush=True)
    settings = list(rows[0])
    mean = {s: {k: sum(rows[d][s][k] for d in rows) / len(rows) for k in rows[0][s]} for s in settings}
    removed = {s: sum(rows[d][s]["share"] <= 0.5 * rows[d]["none"]["share"] for d in rows) for s in settings}
    report = {"export": str(args.export), "samples": args.samples, "seed": args.seed, "unguided": base,
              "by_digit": rows, "mean_over_digits": mean, "digits_at_most_half": removed,
              "command": " ".join(sys.argv), "seconds": round(time.perf_counter() - start, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "nasa.json").write_text(json.dumps(report, indent=2))
    header = ("| negative prompt through | share of the negated digit (mean over digits) | digits whose share at least "
              "halves | mean top-class probability | share read with probability >= 0.9 | FID vs real digits |")
    lines = [header, "|---|---|---|---|---|---|"]
    for s in settings:
        lines.append(f"| {s} | {mean[s]['share']:.3f} | {removed[s] if s != 'none' else ''} | "
                     f"{mean[s]['confidence']:.3f} | {mean[s]['confident_share']:.3f} | "
                     f"{mean[s]['fid_vs_real']:.1f} |")
    (out / "nasa.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
