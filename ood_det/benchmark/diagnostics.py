"""Energy diagnostics of a benchmark: the evidence for why virtual outliers help the energy score or not.

Per finished run of a benchmark result, two things its training and evaluation wrote:

- the logistic slope of its energy loss over training, ``ood/energy_slope`` in its ``metrics.json``
  (:class:`~ood_det.engine.hooks.EnergyDiagnosticsHook`; vos and energy_cfl with the logistic loss);
- the ``diagnostics`` of its ``ood_results.json``
  (:func:`~ood_det.evaluation.ood_evaluation.energy_diagnostics`): the final slope and bias, and the
  mean energy of the kept boxes of the in-distribution test set and of each OOD test set, and of
  virtual outliers.

:func:`write_diagnostics` gathers them per method, mean and sample sd over seeds, into
``energy_diagnostics.json``, a chart ``energy_diagnostics.png`` (left: slope over training; right:
mean energy per method and set) and ``energy_diagnostics.md`` (the tables). The conclusion drawn
from them is written by hand under ``## Conclusion`` in the markdown file; rewriting the file keeps
that section.
"""
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from ..errors import OODDetError
from ..evaluation.ood_evaluation import RESULTS_FILE
from ..palette import OKABE_ITO
from ..utils import atomic_write
from .report import HATCHES, OOD_SET_KINDS
from .stats import mean_sd

FILES = {"json": "energy_diagnostics.json", "chart": "energy_diagnostics.png", "markdown": "energy_diagnostics.md"}
METRICS_FILE = "metrics.json"
#: The event-storage names the training hook logs, and their names here.
CURVES = {"ood/energy_slope": "slope", "ood/energy_bias": "bias"}
CONCLUSION = "## Conclusion"
ID_KEY, VIRTUAL_KEY = "id", "virtual"


def read_curves(path):
    """``{"slope": {iteration: value}, "bias": {...}}`` from a detectron2 metrics.json (one JSON object
    per line; a resumed run appends, and its later line of an iteration wins). Empty without the file."""
    curves = {name: {} for name in CURVES.values()}
    path = Path(path)
    if not path.is_file():
        return curves
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            iteration = int(entry["iteration"])
        except (ValueError, KeyError, TypeError) as e:
            raise OODDetError(f"{path}, line {number}: not a detectron2 metrics line ({e}); remove the line or "
                              "re-run the training that wrote the file") from None
        for key, name in CURVES.items():
            if entry.get(key) is not None:
                curves[name][iteration] = float(entry[key])
    return curves


def read_diagnostics(path):
    """The ``diagnostics`` of an ood_results.json; None, with a warning naming the file, where it has none."""
    path = Path(path)
    try:
        diagnostics = json.loads(path.read_text()).get("diagnostics")
    except (OSError, ValueError, AttributeError) as e:
        raise OODDetError(f"{path}: cannot read the run's results ({e}); re-evaluate the run "
                          "(tools/train_net.py --eval-only MODEL.WEIGHTS <its model_final.pth>)") from None
    if diagnostics is None:
        print(f"warning: {path} has no 'diagnostics' (evaluated by an older ood_det): its energies are left out; "
              "re-evaluate it with tools/train_net.py --eval-only to add them", file=sys.stderr)
    return diagnostics


def read_runs(result, out_root):
    """Per finished run of ``result["runs"]``: method, seed, slope and bias curves and diagnostics."""
    runs = []
    for run in result["runs"]:
        if run.get("returncode") != 0:
            continue
        run_dir = Path(out_root) / run["output_dir"]
        runs.append({"method": run["method"], "seed": run["seed"], **read_curves(run_dir / METRICS_FILE),
                     "diagnostics": read_diagnostics(run_dir / RESULTS_FILE)})
    return runs


def _stat(values):
    mean, sd, n = mean_sd(values)
    return {"mean": mean, "sd": sd, "n": n}


def _curve(per_seed):
    """Mean, sd and number of seeds at each iteration any seed logged."""
    iterations = sorted({i for curve in per_seed for i in curve})
    return [{"iteration": i, **_stat([curve[i] for curve in per_seed if i in curve])} for i in iterations]


def _energy_means(diagnostics, ood_sets):
    """Per seed: set key -> mean energy (None where the run has none)."""
    def mean(summary):
        return None if not summary else summary.get("mean")

    boxes = diagnostics.get("box_energy", {})
    return {ID_KEY: mean(boxes.get(diagnostics.get("id_test_set"))),
            VIRTUAL_KEY: mean(diagnostics.get("virtual_outlier_energy")),
            **{name: mean(boxes.get(name)) for name in ood_sets}}


def summarize(runs, methods=None):
    """The per-method summary of :func:`read_runs`' runs (the JSON document's ``methods``), and the
    in-distribution test set and OOD sets the runs were evaluated on."""
    found = [r["diagnostics"] for r in runs if r["diagnostics"]]
    id_sets = list(dict.fromkeys(str(d.get("id_test_set")) for d in found))
    ood_sets = list(dict.fromkeys(name for d in found for name in d.get("ood_sets", [])))
    methods = [m for m in (methods or dict.fromkeys(r["method"] for r in runs)) if any(r["method"] == m for r in runs)]
    out = {}
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        energies = [_energy_means(r["diagnostics"], ood_sets) for r in mine if r["diagnostics"]]
        out[method] = {
            "seeds": [r["seed"] for r in mine],
            **{f"{name}_curve": _curve([r[name] for r in mine if r[name]]) for name in CURVES.values()},
            "final_slope": _stat([r["diagnostics"]["energy_slope"] for r in mine if r["diagnostics"]]),
            "final_bias": _stat([r["diagnostics"]["energy_bias"] for r in mine if r["diagnostics"]]),
            "energy": {key: _stat([e[key] for e in energies]) for key in (ID_KEY, VIRTUAL_KEY, *ood_sets)},
        }
    return {"id_test_set": ", ".join(id_sets) or None, "ood_sets": ood_sets, "methods": out}


# ---------------------------------------------------------------- markdown
def _pm(stat, digits=3):
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['sd']:.{digits}f}" if stat["sd"] is not None else "")


def set_label(key, summary):
    """A column's name: the in-distribution test set, the virtual outliers, or an OOD set (near / far)."""
    if key == ID_KEY:
        return f"{summary['id_test_set']} (ID test)"
    if key == VIRTUAL_KEY:
        return "virtual outliers"
    kind = OOD_SET_KINDS.get(key)
    return f"{key} ({kind} OOD)" if kind else f"{key} (OOD)"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _energy_table(summary):
    keys = [ID_KEY, VIRTUAL_KEY, *summary["ood_sets"]]
    header = ["method", "seeds", "final slope", "final bias", *(set_label(k, summary) for k in keys)]
    rows = [[method, str(len(m["seeds"])), _pm(m["final_slope"], 4), _pm(m["final_bias"], 4),
             *(_pm(m["energy"][k]) for k in keys)] for method, m in summary["methods"].items()]
    return _table(header, rows)


def _slope_table(summary):
    curves = {m: {p["iteration"]: p for p in s["slope_curve"]}
              for m, s in summary["methods"].items() if s["slope_curve"]}
    iterations = sorted({i for c in curves.values() for i in c})
    rows = [[str(i), *(_pm(c[i], 4) if i in c else "-" for c in curves.values())] for i in iterations]
    return _table(["iteration", *curves], rows) if curves else ["No run logged a slope (ood/energy_slope)."]


def markdown(summary, stem, conclusion=""):
    """The tables as markdown, then ``conclusion`` (a kept ``## Conclusion`` section) as it is."""
    lines = [
        "# Energy diagnostics", "",
        f"Runs of `{stem}.json`; mean ± sample sd over seeds. Energy = -T logsumexp of the foreground logits "
        "(lower = more in-distribution); the logistic energy loss models P(in-distribution) = "
        "sigmoid(slope * (-energy) + bias).", "",
        "## Energy of the boxes and of virtual outliers", "",
        *_energy_table(summary), "",
        "Columns: seeds = finished runs; final slope / bias = the energy loss's logistic regression after "
        "training (- without one: vanilla, margin loss); then the mean energy of the boxes kept at the clean "
        "protocol's confidence threshold on the in-distribution test set, of virtual outliers drawn as "
        "training draws them (- where none were drawn: vanilla, or queues never full), and of the kept boxes "
        "of each OOD test set.", "",
        "## Logistic slope over training", "",
        *_slope_table(summary), "",
        "Columns: iteration = training iteration (0-based) at which ood/energy_slope was logged; then per "
        "method the slope's mean ± sd over the seeds that logged it (a negative slope pushes the virtual "
        "outliers to lower energy).", "",
    ]
    text = "\n".join(lines)
    return text + "\n" + conclusion if conclusion else text


def kept_conclusion(path):
    """Everything of an existing markdown file from its ``## Conclusion`` heading on ("" if none)."""
    path = Path(path)
    if not path.is_file():
        return ""
    found = re.search(rf"^{re.escape(CONCLUSION)}", path.read_text(), re.M)
    return path.read_text()[found.start():] if found else ""


# ---------------------------------------------------------------- chart
def plot(summary, path):
    """Left: slope over training per method (mean, ±sd band); right: mean energy per method and set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = summary["methods"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (method, s) in enumerate(methods.items()):
        if s["slope_curve"]:
            x = np.array([p["iteration"] for p in s["slope_curve"]])
            mean = np.array([p["mean"] for p in s["slope_curve"]])
            sd = np.array([p["sd"] if p["sd"] is not None else 0.0 for p in s["slope_curve"]])
            colour = OKABE_ITO[i % len(OKABE_ITO)]
            left.plot(x, mean, color=colour, marker="o", markersize=3, label=method)
            left.fill_between(x, mean - sd, mean + sd, color=colour, alpha=0.2)
    left.axhline(0.0, color="black", linewidth=0.8)
    left.set_xlabel("iteration")
    left.set_ylabel("logistic slope")
    left.set_title("Energy loss's logistic slope (mean ± sd over seeds)")
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "no run logged ood/energy_slope", ha="center", va="center", transform=left.transAxes)
    _energy_bars(right, summary)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    plt.close(fig)


def _energy_bars(ax, summary):
    keys = [ID_KEY, VIRTUAL_KEY, *summary["ood_sets"]]
    methods = list(summary["methods"])
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        stats = [summary["methods"][m]["energy"][key] for m in methods]
        x = np.arange(len(methods)) + (j - (len(keys) - 1) / 2) * width
        mean = [s["mean"] if s["mean"] is not None else math.nan for s in stats]
        ax.bar(x, mean, width, yerr=[s["sd"] or 0.0 for s in stats], capsize=3, color=OKABE_ITO[j % len(OKABE_ITO)],
               hatch=HATCHES[j % len(HATCHES)], edgecolor="black", linewidth=0.6, label=set_label(key, summary))
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(methods)))
    ax.set_xticklabels(methods)
    ax.set_ylabel("mean energy (lower = more in-distribution)")
    ax.set_title("Mean energy per set (mean ± sd over seeds)")
    ax.legend(fontsize=8)


# ---------------------------------------------------------------- files
def write_diagnostics(result, out_root, folder, stem):
    """``energy_diagnostics.json``, ``.png`` and ``.md`` in ``folder`` from the finished runs of a benchmark
    ``result`` (each run's ``output_dir`` is relative to ``out_root``); ``stem`` names the benchmark's
    files. The markdown keeps an existing file's ``## Conclusion`` section.

    Returns:
        The names of the files written (the chart None when no run finished).
    """
    folder = Path(folder)
    methods = (result.get("settings", {}).get("quality") or {}).get("methods")
    summary = {"benchmark": f"{stem}.json", **summarize(read_runs(result, out_root), methods)}
    files = dict(FILES, chart=FILES["chart"] if summary["methods"] else None)
    if files["chart"]:
        plot(summary, folder / files["chart"])
    atomic_write(folder / files["json"], lambda f: json.dump({**summary, "files": files}, f, indent=2))
    text = markdown(summary, stem, kept_conclusion(folder / files["markdown"]))
    atomic_write(folder / files["markdown"], lambda f: f.write(text))
    return files
