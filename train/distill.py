"""Training entry point for `accelerate launch train/distill.py --config FILE [section.key=value ...]`."""
import sys

from stepdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
