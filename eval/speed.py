"""Speed and memory benchmark: python eval/speed.py --preset tiny|h100 [--out DIR] [--objectives dmd2 lcm regression]

The same as `stepdistill bench`: writes speed.json and speed.md into --out and prints the markdown table."""
import sys

from stepdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
