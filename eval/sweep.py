"""A recipe sweep: every cell (a list of overrides of one base config) trained with several seeds through the
command line, each run timed with /usr/bin/time -v and its export scored with `stepdistill eval`. Finished runs are
skipped, so a sweep can be extended cell by cell. Writes <out>/results.jsonl (one line per run) and <out>/table.md
(mean and spread per cell).

    python eval/sweep.py SPEC.yaml --out runs/sweeps/NAME [--jobs 2] [--cells a b] [--seeds 0 1 2]

SPEC.yaml:
    base: stepdistill/assets/configs/dmd2_digits.yaml       # a config file or preset (single stage or recipe)
    set: [teacher.path=..., data.prompts_file=...]   # overrides of every cell
    eval: [--preset, digits]                         # arguments of `stepdistill eval`
    seeds: [0, 1]
    cells:                                           # overrides, or another base: {base: FILE, set: [...]}
      centre: []
      glr3e-4: [objective.generator_lr=3e-4]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

METRICS = ("prompt_accuracy", "fid_vs_teacher50", "fid_vs_real")


def export_folder(base: str, overrides: list[str]) -> Path:
    """The export of a run: <output_dir>/final, or the last stage's for a recipe."""
    from stepdistill.config import load_config_tree
    from stepdistill.recipes import plan_stages

    tree = load_config_tree(base, overrides)
    if tree.get("recipe"):
        return plan_stages(tree)[-1].final
    return Path(tree["train"]["output_dir"]) / "final"


def timed(command: list[str], log: Path, env: dict) -> dict:
    """Run `command` under /usr/bin/time -v; its output goes to `log`. Wall, CPU (user + sys) seconds, peak RSS."""
    with log.open("w") as f:
        proc = subprocess.run(["/usr/bin/time", "-v", *command], check=False, stdout=f, stderr=subprocess.STDOUT,
                              env=env)
    text = log.read_text()

    def field(name: str) -> str:
        match = re.search(rf"{re.escape(name)}: (.+)", text)
        return match.group(1).strip() if match else "0"

    wall = 0.0
    for part in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":"):
        wall = wall * 60 + float(part)
    return {"returncode": proc.returncode, "wall_s": round(wall, 1),
            "cpu_s": round(float(field("User time (seconds)")) + float(field("System time (seconds)")), 1),
            "max_rss_mb": round(int(field("Maximum resident set size (kbytes)")) / 1024)}


def cell_of(spec: dict, cell: str) -> tuple[str, list[str]]:
    """(base config, the cell's own overrides)."""
    value = spec["cells"][cell]
    if isinstance(value, dict):
        return value.get("base", spec["base"]), list(value.get("set", []))
    return spec["base"], list(value)


def run_one(spec: dict, out: Path, cell: str, seed: int) -> dict:
    run_dir = out / cell / f"seed{seed}"
    base, own = cell_of(spec, cell)
    own = [o.replace("{seed}", str(seed)) for o in own]  # e.g. student.init of the same seed's warm start
    overrides = [*spec.get("set", []), *own, f"train.seed={seed}", f"train.output_dir={run_dir}",
                 "train.overwrite=true", "train.progress=false"]
    run_dir.parent.mkdir(parents=True, exist_ok=True)  # logs beside the run folder: train.overwrite moves it aside
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    py = [sys.executable, "-m", "stepdistill.cli"]
    record = {"cell": cell, "seed": seed, "base": base, "overrides": own}
    record["train"] = timed([*py, "train", "--config", base, *overrides], run_dir.with_suffix(".train.log"), env)
    if record["train"]["returncode"] != 0:
        return record
    folder = export_folder(base, overrides)
    record["eval"] = timed([*py, "eval", str(folder), *spec.get("eval", []), "--out", str(run_dir / "eval")],
                           run_dir.with_suffix(".eval.log"), env)
    metrics_file = run_dir / "eval" / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        record.update({k: metrics[k] for k in METRICS if k in metrics})
    return record


def stat(rows: list[dict], key: str, digits: int) -> str:
    """Mean ± standard deviation over the seeds, then each seed's value."""
    values = [r[key] for r in rows]
    each = " / ".join(f"{v:.{digits}f}" for v in values)
    if len(values) == 1:
        return each
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f} ({each})"


def summarize(records: list[dict], cells: list[str]) -> str:
    lines = ["| cell | overrides | seeds | prompt accuracy | FID vs teacher 50-step | FID vs real | train CPU s |",
             "|---|---|---|---|---|---|---|"]
    for cell in cells:
        rows = [r for r in records if r["cell"] == cell and "fid_vs_teacher50" in r]
        if not rows:
            continue
        cpu = statistics.mean(r["train"]["cpu_s"] for r in rows)
        lines.append(f"| {cell} | {' '.join(rows[0]['overrides']) or '(centre)'} | "
                     f"{','.join(str(r['seed']) for r in rows)} | {stat(rows, 'prompt_accuracy', 3)} | "
                     f"{stat(rows, 'fid_vs_teacher50', 1)} | {stat(rows, 'fid_vs_real', 1)} | {cpu:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec")
    parser.add_argument("--out", required=True)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each on one thread)")
    parser.add_argument("--cells", nargs="*", default=None, help="only these cells (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=None, help="overrides the spec's seeds")
    args = parser.parse_args()
    spec = yaml.safe_load(Path(args.spec).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    finished = {(r["cell"], r["seed"]) for r in done if "fid_vs_teacher50" in r}
    cells = args.cells or list(spec["cells"])
    todo = [(c, s) for c in cells for s in (args.seeds or spec["seeds"]) if (c, s) not in finished]

    def job(item: tuple[str, int]) -> dict:
        record = run_one(spec, out, *item)
        with results.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
        return record

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done += list(pool.map(job, todo))
    table = summarize(done, list(spec["cells"]))
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
