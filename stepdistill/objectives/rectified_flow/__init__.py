"""The rectified-flow family: reflow rounds (rectified flow, InstaFlow, SlimFlow's Annealing Reflow) and SlimFlow's
Flow-Guided Distillation; the one-step distillation of a k-rectified flow is the `regression` objective on the
k-RF's pairs (InstaFlow's distillation stage). docs/RECTIFIED_FLOW.md: conventions, presets, numbers."""
from stepdistill.objectives.rectified_flow.flow_guided import FlowGuided
from stepdistill.objectives.rectified_flow.reflow import Reflow

__all__ = ["FlowGuided", "Reflow"]
