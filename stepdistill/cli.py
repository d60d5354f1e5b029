"""Command line: stepdistill demo | train | pairs | sample | export | eval | plan | bench | teacher | prompts.

Building the parser imports no torch, so `--help` answers at once; each command imports what it needs. Every
failure is one line on stderr naming the file or key and the fix, and the exit code says what kind it was:
2 the input cannot work (a config value, a path, an argument), 130 interrupted by Ctrl-C (143 by SIGTERM), 1 a
failure while running (a full disk, a diverged run, a bug); `--debug` adds the traceback. Human output (progress,
log lines, the result) goes to stderr; `--json` prints the result as JSON on stdout, for machines."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import traceback
from pathlib import Path

from stepdistill import __version__
from stepdistill.errors import Stopped, describe, note_saved


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every other error
        self.exit(2, f"stepdistill: error: {message} (see `{self.prog} --help`)\n")


def _number(kind, low: float, inclusive: bool):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {'whole ' if kind is int else ''}number, got {text!r}")
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low:g}, got {text}")
        return value
    return parse


class _Once(argparse.Action):
    """An option that may be given once: argparse keeps the last of repeated ones silently."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} is given twice ({getattr(namespace, self.dest)!r} and {values!r}): give it "
                         "once (a config is one file; change single keys with section.key=value)")
        setattr(namespace, self.dest, values)


COUNT = _number(int, 1, inclusive=True)  # how many of something: at least one
SEED = _number(int, 0, inclusive=True)
SCALE = _number(float, 0, inclusive=True)  # guidance scales, standard form
POSITIVE = _number(float, 0, inclusive=False)


# Names the parser offers, spelled here so that `--help` imports no torch; tests/test_shapes.py checks them against
# stepdistill.miniature.DATASETS and stepdistill.evaluation.coco.PRESETS.
MINIATURE_WORLDS = ("digits", "shapes")
COCO_PRESETS = ("coco2014-30k", "coco2017-5k")


def build_parser() -> Parser:
    parser = Parser(prog="stepdistill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"stepdistill {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="print the traceback of an error")
    common.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> Parser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    p = command("train", "distill a student: stepdistill train --config FILE|PRESET [section.key=value ...]")
    p.add_argument("--config", default=None, action=_Once,
                   help="a YAML file or a preset name (default: the schema's defaults)")
    p.add_argument("--stage", dest="stages", action="append", default=None, metavar="NAME",
                   help="run only this stage of a recipe (repeatable; a fan-out's name: all its stages), e.g. one "
                        "launch per GPU group")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=100")
    p = command("pairs", "cache a config's teacher pairs ahead of training, split across the processes of "
                "`accelerate launch -m stepdistill pairs ...`; a stopped run continues with the missing shards")
    p.add_argument("--config", default=None, action=_Once,
                   help="a YAML file or a preset name (default: the schema's defaults)")
    p.add_argument("--shard-size", type=COUNT, default=8192, help="pairs per shard file, the unit of work (8192)")
    p.add_argument("--batch-size", type=COUNT, default=1024, help="pairs per teacher batch (1024)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. objective.pairs.num=100000")
    p = command("sample", "images from an exported student or a pipeline folder, with a labelled grid")
    p.add_argument("export", help="an exported student (final/) or a diffusers pipeline folder")
    p.add_argument("prompts", nargs="*", help="prompts (class indices for a class-conditional analytic teacher)")
    p.add_argument("--num", type=COUNT, default=None, help="images per prompt (default 4; points: 1024)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the first image; the next ones count up")
    p.add_argument("--out", default="samples", help="output folder (default: samples)")
    p.add_argument("--steps", type=COUNT, default=None, help="sampling steps (default: the export's recipe)")
    p.add_argument("--guidance", type=SCALE, default=None, help="guidance scale (default: the export's recipe)")
    p.add_argument("--image", default=None, help="the first frame of an image-to-video pipeline (a picture file)")
    p = command("export", "write a checkpoint as a student folder (EMA or raw weights, LoRA merged or as adapter)")
    p.add_argument("checkpoint", help="a checkpoint-N folder, or a run folder (its newest intact checkpoint)")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--weights", choices=["auto", "ema", "raw"], default="auto",
                   help="EMA or raw generator weights (auto: EMA when the run kept one)")
    p.add_argument("--lora", choices=["merged", "adapter"], default="merged",
                   help="a LoRA student as a full pipeline with the LoRA merged, or the adapter alone")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty --out (its contents are moved to <out>.replaced-<time>)")
    p = command("teacher", "train an offline teacher: stepdistill teacher digits|shapes [--seed 0]")
    p.add_argument("name", choices=MINIATURE_WORLDS)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--out", default=None, help="teacher pipeline folder (default: runs/teachers/NAME; never inside "
                   "the installed package, whose shipped teacher stays as it is)")
    p.add_argument("--classifier-out", default=None, help="classifier folder, reused when it holds one (default: the "
                   "shipped classifier, else runs/teachers/NAME_classifier)")
    p.add_argument("--vae-steps", type=COUNT, default=None, help="default: the dataset's recipe")
    p.add_argument("--unet-steps", type=COUNT, default=None, help="default: the dataset's recipe")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda where available)")
    p.add_argument("--eval-per-digit", type=COUNT, default=20, help="teacher samples per digit for its accuracy")
    p.add_argument("--reference-per-digit", type=COUNT, default=50, help="50-step samples per digit, FID reference")
    p = command("demo", "the offline default job (no download): DMD2 on the shipped digits teacher")
    p.add_argument("--eval-per-digit", type=COUNT, default=50, help="evaluation samples per digit")
    p.add_argument("overrides", nargs="*")
    p = command("eval", "evaluate a pipeline folder: digits, shapes, coco2014-30k or coco2017-5k preset")
    p.add_argument("pipeline", help="a diffusers pipeline folder (an exported student or a teacher)")
    p.add_argument("--preset", default="digits", choices=[*MINIATURE_WORLDS, *COCO_PRESETS])
    p.add_argument("--out", default=None, help="output folder (default: runs/eval/<pipeline>-<preset>)")
    p.add_argument("--captions", help="COCO captions file (captions_val2014.json, or one caption per line)")
    p.add_argument("--reference", help="reference image folder for FID (e.g. val2014)")
    p.add_argument("--num-samples", type=COUNT, help="overrides the preset's N (30000 / 5000; digits, shapes: per class)")
    p.add_argument("--resolution", type=COUNT, help="overrides the preset's eval resolution (256)")
    p.add_argument("--seed", type=SEED)
    p.add_argument("--steps", type=COUNT, help="sampling steps (default: the exported recipe's, else 50)")
    p.add_argument("--guidance", type=SCALE, help="CFG scale (default: the exported recipe's, else the preset's)")
    p.add_argument("--batch-size", type=COUNT)
    p.add_argument("--clip-model", default=None, help="CLIP model: hub id or local folder")
    p.add_argument("--fid-backend", default="cleanfid", choices=["cleanfid", "torchmetrics"])
    p.add_argument("--fid-mode", default="clean", choices=["clean", "legacy_tensorflow", "legacy_pytorch"])
    p.add_argument("--feature", default="inception", choices=["inception", *MINIATURE_WORLDS],
                   help="FID features: Inception, or a miniature world's classifier (offline)")
    p.add_argument("--inception-weights", default="", help="local Inception weights file (torchmetrics backend)")
    p.add_argument("--speed", action="store_true", help="also measure latency and throughput")
    p = command("plan", "per-GPU memory estimate of a config and the options that make it fit")
    p.add_argument("--config", default=None, action=_Once,
                   help="a YAML file or a preset name (default: the schema's defaults)")
    p.add_argument("--gpu-gib", type=POSITIVE, default=80.0, help="memory of one GPU, GiB")
    p.add_argument("--num-gpus", type=COUNT, default=1,
                   help="GPUs in the run (all nodes): above 1, every estimate is per GPU under FSDP full shard")
    p.add_argument("--model", default=None, help="architecture: tiny-sd|tiny-sdxl|sd15|sdxl (default: teacher.kind)")
    p.add_argument("overrides", nargs="*")
    p = command("bench", "training-step and sampling speed: --preset tiny (CPU) | h100 (GPU)")
    p.add_argument("--preset", choices=["tiny", "h100", "fullsize"], default="tiny",
                   help="fullsize: every SD-scale preset at the real network size on CPU (python eval/fullsize.py)")
    p.add_argument("--out", default="runs/speed", help="folder for speed.json and speed.md")
    p.add_argument("--objectives", nargs="+", default=None, choices=["dmd2", "lcm", "regression"])
    p = command("prompts", "a prompts file (data.prompts_file) from COCO captions JSON, a CSV/Parquet captions "
                "column (LAION: TEXT), JSON lines or text")
    p.add_argument("source", help="captions_train2014.json, a .csv/.tsv/.parquet table, a .jsonl or a text file")
    p.add_argument("--out", required=True, help="the prompts file to write (one prompt per line; must not exist)")
    p.add_argument("--column", default=None, help="the captions column of a table (default: TEXT, caption, text)")
    p.add_argument("--max", type=COUNT, default=None, dest="limit", help="keep this many, a seeded random subset")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the --max subset")
    return parser


# ---------------------------------------------------------------------------------------------- commands
def _out_folder(value: str, flag: str) -> Path:
    from stepdistill.config import check_output_dir

    return check_output_dir(value, key=flag)


def _train(args: argparse.Namespace) -> dict:
    from stepdistill.config import ConfigError, check_before_import, config_from_dict, load_config_tree

    tree = load_config_tree(args.config, args.overrides)
    if tree.get("recipe"):  # a multi-stage run: one training per stage
        from stepdistill.recipes import train_recipe
        from stepdistill.training.run import finish_recipe

        return finish_recipe(tree, train_recipe(tree, only=args.stages))
    if args.stages:
        raise ConfigError("--stage selects stages of a recipe, and this config has no recipe")
    check_before_import(tree)
    cfg = config_from_dict(tree)
    from stepdistill.training import run_training
    from stepdistill.training.rundir import locked_run_dir

    try:
        with locked_run_dir(cfg.train.output_dir):
            return run_training(cfg)
    except BaseException as e:
        note_saved(e, cfg.train.output_dir)
        raise


def _pairs(args: argparse.Namespace) -> dict:
    from stepdistill.config import ConfigError, check_before_import, config_from_dict, load_config_tree

    tree = load_config_tree(args.config, args.overrides)
    if tree.get("recipe"):
        raise ConfigError("`pairs` caches the pairs of one training, and this config is a recipe of stages: give "
                          "the config of the stage that uses pairs")
    check_before_import(tree)
    from stepdistill.training.pairs import cache_pairs

    return cache_pairs(config_from_dict(tree), args.shard_size, args.batch_size)


def _sample(args: argparse.Namespace) -> dict:
    from stepdistill.sample import sample

    out = _out_folder(args.out, "--out")
    return sample(args.export, args.prompts, args.num, args.seed, out, args.steps, args.guidance, args.image)


def _export(args: argparse.Namespace) -> dict:
    from stepdistill.training.restore import export_checkpoint

    out = _out_folder(args.out, "--out")
    return export_checkpoint(args.checkpoint, out, args.weights, args.lora, args.overwrite)


def _teacher(args: argparse.Namespace) -> dict:
    from stepdistill.miniature.teacher import build_teacher

    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return build_teacher(
        args.name, args.out, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
        classifier_dir=args.classifier_out, device=device,
        eval_per_class=args.eval_per_digit, reference_per_class=args.reference_per_digit)


def _demo(args: argparse.Namespace) -> dict:
    from stepdistill.miniature.demo import run_demo

    return run_demo(args.overrides, per_class=args.eval_per_digit)


def _eval(args: argparse.Namespace) -> dict:
    if args.out is None:  # beside the runs, never inside the model folder being evaluated
        name = "-".join(Path(args.pipeline).resolve().parts[-2:])
        args.out = str(Path("runs") / "eval" / f"{name}-{args.preset}")
    _out_folder(args.out, "--out")
    from stepdistill.evaluation.command import evaluate_cli

    return evaluate_cli(args)


def _plan(args: argparse.Namespace) -> dict:
    from stepdistill.config import load_config
    from stepdistill.perf.memory import plan

    return plan(load_config(args.config, args.overrides), args.gpu_gib, args.model, num_gpus=args.num_gpus)


def _plan_table(summary: dict) -> list[str]:
    """The planner's estimates as a table a person reads (--json prints them all, per module, for machines)."""
    rows = [("option", "fits", "total", "weights", "grads", "optimizer", "activations", "set")]
    rows += [(e["option"], "yes" if e["fits"] else "no", *(f"{e[k]:.3g}" for k in ("total", "weights", "grads",
             "optimizer", "activations")), " ".join(e["set"]) or "-") for e in summary["estimates"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    head = (f"stepdistill: plan for one {summary['gpu_gib']:g} GiB GPU ({summary['headroom']:.0%} of it usable), "
            "estimates in GiB:")
    return [head, *lines, f"  recommendation: {summary['recommendation']}"]


def _bench(args: argparse.Namespace) -> dict:
    from stepdistill.perf.speed import run_and_write

    out = _out_folder(args.out, "--out")
    if args.preset == "fullsize":
        from stepdistill.perf.fullsize import bench

        return bench(out)
    command = f"stepdistill bench --preset {args.preset} --out {args.out}" + \
        (f" --objectives {' '.join(args.objectives)}" if args.objectives else "")
    return run_and_write(args.preset, args.objectives, out, command)


def _prompts(args: argparse.Namespace) -> dict:
    from stepdistill.config import ConfigError

    if Path(args.out).exists():
        raise ConfigError(f"--out {args.out} exists: give a new file name (an existing file is never replaced)")
    from stepdistill.data.captions import write_prompts

    return write_prompts(args.source, args.out, args.column, args.limit, args.seed)


HUMAN_OUTPUT = {"plan": _plan_table}  # commands whose result reads better as a table than as key: value lines
COMMANDS = {"train": _train, "pairs": _pairs, "sample": _sample, "export": _export, "teacher": _teacher, "demo": _demo,
            "eval": _eval, "plan": _plan, "bench": _bench, "prompts": _prompts}


# ---------------------------------------------------------------------------------------------- output
class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        kind = "warning: " if record.levelno >= logging.WARNING else ""
        return f"stepdistill: {kind}{record.getMessage()}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record arrives (main() may run several times in one process)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _vacuous_float32_warning(record: logging.LogRecord) -> bool:
    """False for diffusers' "should be kept in float32: []" warning. diffusers (0.42) warns on every `.to(dtype)`
    of a model, even when the model keeps no module in float32 (the list is empty, so the cast changes nothing the
    warning is about); the teacher's bf16 cast and the trainable fp32 copies cast on purpose. A non-empty list is
    still shown."""
    return "should be kept in float32: []." not in record.getMessage()


def _configure_logging(debug: bool) -> None:
    """The package's log lines (resumed from ..., warnings) on stderr, once per process."""
    diffusers_models = logging.getLogger("diffusers.models.modeling_utils")  # the logger diffusers writes it to
    if _vacuous_float32_warning not in diffusers_models.filters:
        diffusers_models.addFilter(_vacuous_float32_warning)
    logger = logging.getLogger("stepdistill")
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Formatter())
        logger.addHandler(handler)


def _human(summary: dict, indent: str = "") -> list[str]:
    lines = []
    for key, value in summary.items():
        if isinstance(value, dict) and value:
            lines += [f"{indent}{key}:", *_human(value, indent + "  ")]
        elif isinstance(value, float):
            lines.append(f"{indent}{key}: {value:.6g}")
        else:
            lines.append(f"{indent}{key}: {value if isinstance(value, str) else json.dumps(value, default=str)}")
    return lines


def _terminate(signum: int, frame: object) -> None:
    raise Stopped(signum, "terminated (SIGTERM)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.debug)
    previous = signal.signal(signal.SIGTERM, _terminate)  # cleanups (temporary folders) run on SIGTERM too
    try:
        summary = COMMANDS[args.command](args)
    except Exception as e:  # noqa: BLE001 - the boundary: every failure becomes one line and an exit code
        code, message = describe(e)
        if args.debug:
            traceback.print_exc()
        print(f"stepdistill: {'error: ' if code == 2 else ''}{message}", file=sys.stderr)
        return code
    except KeyboardInterrupt as e:
        code, message = describe(e)
        print(f"stepdistill: {message}", file=sys.stderr)
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch / torchrun the main process reports
        return 0
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        human = HUMAN_OUTPUT.get(args.command)
        lines = human(summary) if human else [f"stepdistill: {args.command} done", *_human(summary, "  ")]
        print("\n".join(lines), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
