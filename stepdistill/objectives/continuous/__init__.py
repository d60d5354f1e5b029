"""The continuous-time consistency family: sCD (and rCM) on TrigFlow, MeanFlow. docs/CONTINUOUS_CONSISTENCY.md:
conventions, presets, numbers."""
