"""Speed and memory at real scale: random-weight SD1.5/SDXL builders, training/sampling benchmarks, memory planner."""
