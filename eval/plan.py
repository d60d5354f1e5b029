"""Per-GPU memory plan of a training config, the same as `stepdistill plan`:
python eval/plan.py --config FILE [--gpu-gib 80] [--model sd15|sdxl|tiny-sd|tiny-sdxl] [key=value ...]"""
import sys

from stepdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["plan", *sys.argv[1:]]))
