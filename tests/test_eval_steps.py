"""`stepdistill eval --steps N` (and the COCO presets' steps) on a few-step export whose recipe carries an explicit
grid: the pipeline follows the grid, so N takes its first N times (the student's N-step sampler) instead of being
ignored while the metrics report N; more steps than the grid has is refused with the grid named."""
import pytest

from stepdistill.pipelines import sampling_kwargs

RECIPE = {"pipeline_kwargs": {"timesteps": [999, 349], "guidance_scale": 0.0, "eta": 1.0}}


def test_steps_take_the_first_times_of_the_students_grid():
    assert sampling_kwargs(RECIPE, 1) == {"timesteps": [999], "eta": 1.0}
    assert sampling_kwargs(RECIPE, 2) == {"timesteps": [999, 349], "eta": 1.0}
    assert sampling_kwargs(RECIPE) == {"timesteps": [999, 349], "eta": 1.0}  # the recipe's own count
    flow = {"pipeline_kwargs": {"sigmas": [1.0, 0.496], "num_inference_steps": 2}}
    assert sampling_kwargs(flow, 1) == {"sigmas": [1.0]}


def test_more_steps_than_the_grid_is_refused():
    with pytest.raises(ValueError, match=r"timesteps \[999, 349\] \(2 steps at most\); ask for 2 steps or fewer"):
        sampling_kwargs(RECIPE, 3)
