"""Speed and memory benchmark: python eval/speed.py --preset tiny|h100 [--out DIR] [--objectives dmd2 lcm regression]

Writes speed.json and speed.md into --out and prints the markdown table."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stepdistill.perf.speed import OBJECTIVE_CONFIGS, PRESETS, markdown, run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", default="runs/speed")
    parser.add_argument("--objectives", nargs="+", choices=sorted(OBJECTIVE_CONFIGS), default=None)
    args = parser.parse_args(argv)
    result = run(args.preset, args.objectives)
    result["command"] = " ".join(["python", "eval/speed.py", *(argv if argv is not None else sys.argv[1:])])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out / "speed.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
