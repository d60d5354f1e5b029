"""`accelerate launch train/distill.py --config FILE [section.key=value ...]` from inside the checkout; anywhere
else (an installed package) the same is `accelerate launch -m stepdistill train --config FILE ...`."""
import sys

from stepdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
