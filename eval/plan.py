"""Per-GPU memory plan of a training config: python eval/plan.py --config FILE [--gpu-gib 80] [key=value ...]"""
from __future__ import annotations

import argparse
import json

from stepdistill.config import load_config
from stepdistill.perf.memory import plan


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU, GiB")
    parser.add_argument("--model", default=None, help="architecture: tiny-sd|tiny-sdxl|sd15|sdxl (default: teacher.kind)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    result = plan(load_config(args.config, args.overrides), args.gpu_gib, args.model)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
