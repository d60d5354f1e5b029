"""Shipped SD-scale presets at the real network size on CPU, and the planner vs measured memory:
python eval/fullsize.py planner|presets [--out DIR] [--only ...] (stepdistill/perf/fullsize.py)."""
import sys

from stepdistill.perf.fullsize import main

if __name__ == "__main__":
    sys.exit(main())
