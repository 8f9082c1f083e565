"""The evaluation report: `<workdir>/report.md` with its pictures and numbers in `<workdir>/report/`.

    report.md                 summary table (per subset, the headline number of each task, the MTP
                              average), per-class tables, training summary, the pictures below
    report/metrics.json       every number of the evaluation (and the training history)
    report/loss.png           training losses over steps (from metrics.jsonl)
    report/eval.png           evaluation headline numbers over steps (when evaluated more than once)
    report/<subset>_predictions.png  image | ground truth | prediction rows (maps, rotated boxes)
    report/<subset>_<task>_per_class.png  per-class IoU / AP bars
    report/<subset>_ss_confusion.png      row-normalised confusion matrix

Numbers in report.md are percentages with two decimals (as the paper prints them); metrics.json
keeps fractions. Only process 0 writes.
"""

import json
import math
import os

import numpy as np

from mtp_jax.metrics import drawing, writers
from mtp_jax.metrics.multitask import HEADLINE, HEADLINE_NAMES, headline

REPORT_MD = "report.md"
REPORT_DIR = "report"


def percent(value) -> str:
  return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def markdown_table(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _per_class(task: str, result: dict) -> tuple[str, dict] | None:
  """(label, {class: value}) of a task result: IoU for ss, AP for detection tasks."""
  if task == "ss":
    return "IoU", result["iou_per_class"]
  for source in (result, result.get("segm", {})):
    if "ap_per_class" in source:
      return "AP", source["ap_per_class"]
  return None


def _series(rows: list[dict], key: str) -> tuple[list, list]:
  """(steps, values) of `key` over the rows; a step logged twice (re-evaluated) keeps its last value."""
  by_step = {r["step"]: r[key] for r in rows if key in r}
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def _curves(rows: list[dict]) -> dict:
  """{picture name: chart} of the metrics.jsonl rows: losses, and eval headlines if logged twice."""
  charts = {}
  loss_keys = sorted({k for r in rows for k in r if k == "loss" or k.startswith(("ss/", "is/", "rd/"))})
  if loss_keys:
    charts["loss"] = drawing.curves_chart({k: _series(rows, k) for k in loss_keys}, "training loss")
  eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/")})
  eval_series = {k[len("eval/"):]: _series(rows, k) for k in eval_keys}
  if any(len(steps) > 1 for steps, _ in eval_series.values()):
    charts["eval"] = drawing.curves_chart(eval_series, "evaluation (valid split)")
  return charts


def markdown(results: dict, pictures) -> str:
  """report.md text of `results` (see write_report); `pictures` are the written picture names."""
  evaluation = results["eval"]
  tasks = [t for t in HEADLINE if any(t in r for r in evaluation.values())]
  out = [f"# mtp_jax report: step {results['step']}", "",
         f"Checkpoint `{results.get('checkpoint', 'n/a')}`, evaluated on the valid split "
         f"({results.get('mode', 'train')} run). Numbers are percentages.", "",
         "## Summary", ""]
  rows = [[s] + [percent(headline(t, r[t])) if t in r else "-" for t in tasks] for s, r in evaluation.items()]
  out.append(markdown_table(["subset"] + [f"{t} {HEADLINE_NAMES[t]}" for t in tasks], rows))
  if results.get("mtp_average") is not None:
    out += ["", f"**MTP average** (mean of the {3 * len(evaluation)} numbers above, MTP_SPEC §3.6): "
                f"{percent(results['mtp_average'])}"]
  for s, per_task in evaluation.items():
    out += ["", f"## {s}", ""]
    if "ss" in per_task:
      ss = per_task["ss"]
      out.append(f"Semantic segmentation: mIoU {percent(ss['miou'])}, overall accuracy "
                 f"{percent(ss['overall_accuracy'])}, mean accuracy {percent(ss['macc'])}, "
                 f"{ss['pixels']} pixels.")
      out += ["", markdown_table(["class", "IoU", "accuracy"],
                                 [[n, percent(v), percent(ss["accuracy_per_class"][n])]
                                  for n, v in ss["iou_per_class"].items()])]
    for t, r in per_task.items():
      if t != "ss" and _per_class(t, r):
        label, values = _per_class(t, r)
        out += ["", f"{t} {HEADLINE_NAMES[t]} {percent(headline(t, r))}", "",
                markdown_table(["class", label], [[n, percent(v)] for n, v in values.items()])]
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


def pictures_of(results: dict, rows: dict, metric_rows: list[dict]) -> dict:
  """{name: (H, W, 3) uint8} for the report: per subset the prediction rows (`rows[subset]`, a
  list of drawing.comparison_row images), per-class bars and the confusion matrix; curves."""
  out = {}
  for s, per_task in results["eval"].items():
    if rows.get(s):
      out[f"{s}_predictions"] = drawing.stack(rows[s])
    for t, r in per_task.items():
      per_class = _per_class(t, r)
      if per_class:
        label, values = per_class
        out[f"{s}_{t}_per_class"] = drawing.bar_chart(values, f"{s} {t}: {label} per class", label)
    if "ss" in per_task:
      out[f"{s}_ss_confusion"] = drawing.confusion_chart(
          per_task["ss"]["confusion"], list(per_task["ss"]["iou_per_class"]), f"{s} semantic segmentation")
  out.update(_curves(metric_rows))
  return out


def write_report(workdir: str, results: dict, rows: dict | None = None) -> dict:
  """Writes report.md, report/metrics.json and the pictures; returns {"report", "metrics",
  "pictures": {name: path}, "images": {name: (H, W, 3) uint8}}.

  results: {"step", "checkpoint", "mode", "eval": {subset: {task: result}}, "mtp_average",
  "train" (optional)}; rows: {subset: [comparison rows]}. The pictures use `<workdir>/metrics.jsonl`.
  """
  folder = os.path.join(workdir, REPORT_DIR)
  os.makedirs(folder, exist_ok=True)
  pictures = pictures_of(results, rows or {}, writers.read_rows(workdir))
  for name, image in pictures.items():
    drawing.save_png(image, os.path.join(folder, f"{name}.png"))
  paths = {"report": os.path.join(workdir, REPORT_MD), "metrics": os.path.join(folder, "metrics.json"),
           "pictures": {n: os.path.join(folder, f"{n}.png") for n in pictures}, "images": pictures}
  with open(paths["metrics"], "w") as f:
    json.dump(jsonable(results), f, indent=1)
  with open(paths["report"], "w") as f:
    f.write(markdown(results, list(pictures)))
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
