"""The benchmark as a library: three methods side by side, with paired confidence intervals,
and what the OOD head costs. ``tools/benchmark.py`` is its command line.

- :mod:`.runs`: the plan (configs, seeds, scaled schedule) and the training subprocesses;
- :mod:`.stats`: means over seeds, paired differences, Student t intervals, goals;
- :mod:`.cost`: the cost measurements (training step, inference, synthesis, memory);
- :mod:`.report`: the result document, its markdown and its chart;
- :mod:`.provenance`: commit, machine and command of a result.
"""
from .cost import COST_PRESETS, cost_settings, resolve_device, run_cost
from .report import (
    add_quality,
    collect_records,
    file_names,
    finish_result,
    markdown,
    new_result,
    write_json,
    write_results,
)
from .runs import (
    CONVERGENCE_IMAGES,
    CONVERGENCE_POINTS,
    DEFAULT_SEEDS,
    METHODS,
    QUICK_METHOD_SCALE,
    QUICK_SCALE,
    QUICK_TRUNK_SCALE,
    VALIDATION_OPTS,
    failed_runs,
    plan_quality,
    prepare_datasets,
    run_quality,
    scale_schedule,
)
from .stats import aggregate, comparisons, t_interval, t_quantile

__all__ = [
    "CONVERGENCE_IMAGES", "CONVERGENCE_POINTS", "COST_PRESETS", "DEFAULT_SEEDS", "METHODS", "QUICK_METHOD_SCALE",
    "QUICK_SCALE", "QUICK_TRUNK_SCALE",
    "VALIDATION_OPTS",
    "add_quality", "aggregate", "collect_records", "comparisons", "cost_settings", "failed_runs", "file_names",
    "finish_result", "markdown",
    "new_result", "plan_quality", "prepare_datasets", "resolve_device", "run_cost", "run_quality",
    "scale_schedule", "t_interval", "t_quantile", "write_json", "write_results",
]
