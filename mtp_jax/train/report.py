"""The evaluation report: `<workdir>/report.md` with its pictures and numbers in `<workdir>/report/`.

    report.md                 summary table (per subset, the headline number of each task, the MTP
                              average), per-class tables, training summary, the pictures below
    report/metrics.json       every number of the evaluation (and the training history)
    report/loss.png           training losses over steps (from metrics.jsonl)
    report/eval.png           evaluation headline numbers over steps (when evaluated more than once)
    report/<subset>_predictions.png  image | ground truth | prediction rows (maps, rotated boxes)
    report/<subset>_<task>_per_class.png  per-class IoU / AP bars
    report/<subset>_...png    each task's own pictures (ss: the row-normalised confusion matrix)

Numbers in report.md are percentages with two decimals (as the paper prints them); metrics.json
keeps fractions. Only process 0 writes. Every task-specific part (headline, per-class table,
text, extra pictures) comes from the task objects (mtp_jax/tasks/, {name: Task}); the report
names no task.
"""

import json
import math
import os

import numpy as np

from mtp_jax.metrics import drawing, writers
from mtp_jax.tasks import MTP_AVERAGE

REPORT_MD = "report.md"
REPORT_DIR = "report"


def percent(value) -> str:
  return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def markdown_table(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _series(rows: list[dict], key: str) -> tuple[list, list]:
  """(steps, values) of `key` over the rows; a step logged twice (re-evaluated) keeps its last value."""
  by_step = {r["step"]: r[key] for r in rows if key in r}
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def _curves(rows: list[dict], task_names) -> dict:
  """{picture name: chart} of the metrics.jsonl rows: losses, and eval headlines if logged twice."""
  charts = {}
  prefixes = tuple(f"{t}/" for t in task_names)
  loss_keys = sorted({k for r in rows for k in r if k == "loss" or (prefixes and k.startswith(prefixes))})
  if loss_keys:
    charts["loss"] = drawing.curves_chart({k: _series(rows, k) for k in loss_keys}, "training loss")
  eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/")})
  eval_series = {k[len("eval/"):]: _series(rows, k) for k in eval_keys}
  if any(len(steps) > 1 for steps, _ in eval_series.values()):
    charts["eval"] = drawing.curves_chart(eval_series, "evaluation (valid split)")
  return charts


def markdown(results: dict, pictures, tasks: dict) -> str:
  """report.md text of `results` (see write_report); `pictures` are the written picture names."""
  evaluation = results["eval"]
  names = [t for t in tasks if any(t in r for r in evaluation.values())]
  out = [f"# mtp_jax report: step {results['step']}", "",
         f"Checkpoint `{results.get('checkpoint', 'n/a')}`, evaluated on the {results.get('split', 'valid')} split "
         f"({results.get('mode', 'train')} run). Numbers are percentages.", "",
         "## Summary", ""]
  rows = [[s] + [percent(tasks[t].headline(r[t])) if t in r else "-" for t in names]
          for s, r in evaluation.items()]
  out.append(markdown_table(["subset"] + [f"{t} {tasks[t].headline_name}" for t in names], rows))
  if results.get("mtp_average") is not None:
    out += ["", f"**MTP average** (mean of the {len(MTP_AVERAGE) * len(evaluation)} numbers above, MTP_SPEC §3.6): "
                f"{percent(results['mtp_average'])}"]
  for s, per_task in evaluation.items():
    out += ["", f"## {s}"]
    for t, r in per_task.items():
      out += ["", tasks[t].summary(r)]
      table = tasks[t].class_table(r)
      if table:
        header, columns = table
        out += ["", markdown_table(["class"] + header,
                                   [[n] + [percent(c[n]) for c in columns] for n in columns[0]])]
    out += [""] + [f"![{p}]({REPORT_DIR}/{p}.png)" for p in pictures if p.startswith(f"{s}_")]
  train = results.get("train")
  if train and train.get("history"):
    last = train["history"][-1]
    out += ["", "## Training", "",
            f"Steps {train['start_step']} -> {train['end_step']} in this run; last logged step "
            f"{last['step']}: loss {last['loss']:.4f}, {last.get('steps_per_sec', float('nan')):.2f} steps/s, "
            f"{int(last.get('nonfinite_steps', 0))} skipped non-finite steps."]
  out += [""] + [f"![{p}]({REPORT_DIR}/{p}.png)" for p in ("loss", "eval") if p in pictures]
  return "\n".join(out) + "\n"


def pictures_of(results: dict, rows: dict, metric_rows: list[dict], tasks: dict) -> dict:
  """{name: (H, W, 3) uint8} for the report: per subset the prediction rows (`rows[subset]`, a
  list of drawing.comparison_row images), per-class bars and each task's own pictures; curves."""
  out = {}
  for s, per_task in results["eval"].items():
    if rows.get(s):
      out[f"{s}_predictions"] = drawing.stack(rows[s])
    for t, r in per_task.items():
      per_class = tasks[t].per_class(r)
      if per_class:
        label, values = per_class
        out[f"{s}_{t}_per_class"] = drawing.bar_chart(values, f"{s} {t}: {label} per class", label)
      out.update(tasks[t].report_pictures(s, r))
  out.update(_curves(metric_rows, tuple(tasks)))
  return out


def write_report(workdir: str, results: dict, tasks: dict, rows: dict | None = None) -> dict:
  """Writes report.md, report/metrics.json and the pictures; returns {"report", "metrics",
  "pictures": {name: path}, "images": {name: (H, W, 3) uint8}}.

  results: {"step", "checkpoint", "mode", "eval": {subset: {task: result}}, "mtp_average",
  "train" (optional)}; tasks: {name: Task}, read through their `TaskEvaluation` face; rows: {subset: [comparison rows]}. The pictures use
  `<workdir>/metrics.jsonl`.
  """
  folder = os.path.join(workdir, REPORT_DIR)
  os.makedirs(folder, exist_ok=True)
  pictures = pictures_of(results, rows or {}, writers.read_rows(workdir), tasks)
  for name, image in pictures.items():
    drawing.save_png(image, os.path.join(folder, f"{name}.png"))
  paths = {"report": os.path.join(workdir, REPORT_MD), "metrics": os.path.join(folder, "metrics.json"),
           "pictures": {n: os.path.join(folder, f"{n}.png") for n in pictures}, "images": pictures}
  with open(paths["metrics"], "w") as f:
    json.dump(jsonable(results), f, indent=1)
  with open(paths["report"], "w") as f:
    f.write(markdown(results, list(pictures), tasks))
  return paths


def jsonable(value):
  """numpy arrays/scalars -> lists/numbers, NaN -> None (strict JSON)."""
  if isinstance(value, dict):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return jsonable(value.tolist())
  if isinstance(value, (np.floating, float)):
    return None if math.isnan(value) else float(value)
  if isinstance(value, np.integer):
    return int(value)
  return value
