"""Report pictures from plain arrays and report.md/metrics.json from a results dict: rotated boxes
land where DESIGN.md's convention puts them, tables hold the numbers, the MTP average is the mean
of the nine headline numbers."""

import json
import math

import numpy as np
import pytest

from mtp_jax import config as config_lib
from mtp_jax.metrics import drawing
from mtp_jax.train import report
from mtp_jax.tasks import mtp_average
from mtp_jax.tasks import Task, build_tasks


class _MaskAP(Task):
  """Stands for the instance-segmentation task without its Mask R-CNN: headline mask AP,
  per-class AP; everything else as the base class."""
  name, title, headline_name = "is", "instance segmentation", "mask AP"

  def headline(self, result):
    return result["segm"]["AP"]

  def per_class(self, result):
    return "AP", result["segm"]["ap_per_class"]


def _tasks():
  c = config_lib.pretrain_defaults()
  c.tasks.rd.enabled = True
  names = {"sota": ["plane", "ship"], "sior": ["plane", "ship"], "fast": ["plane", "ship"]}
  tasks = build_tasks(c, names)
  return {"ss": tasks["ss"], "is": _MaskAP(c.tasks["is"], c.data, c.eval, names), "rd": tasks["rd"]}


def test_draw_rboxes_outlines_the_le90_corners_and_leaves_the_input_alone():
  image = np.zeros((40, 60, 3), np.uint8)
  # w 30 along +x turned by +90 degrees (clockwise on screen, y down) becomes vertical: corners
  # at x = 30 +- 5, y = 20 +- 15.
  out = drawing.draw_rboxes(image, [[30, 20, 30, 10, np.pi / 2]], colour=(255, 0, 0))
  assert image.sum() == 0                        # input untouched
  drawn = np.argwhere(out[..., 0] == 255)
  assert drawn[:, 0].min() == 5 and drawn[:, 0].max() == 35     # rows (y)
  assert drawn[:, 1].min() == 25 and drawn[:, 1].max() == 35    # columns (x)
  assert out[20, 30].sum() == 0                  # an outline, not filled
  coloured = drawing.draw_rboxes(image, [[30, 20, 30, 10, 0.0]], labels=[4])
  assert tuple(coloured[15, 20]) == tuple(drawing.palette()[5])   # class k drawn as map colour k + 1


def test_charts_and_rows_are_rgb_images():
  bars = drawing.bar_chart({"plane": 0.9, "ship": float("nan"), "harbor": 0.2}, "AP", "AP")
  conf = drawing.confusion_chart(np.array([[5, 1], [0, 0]]), ["background", "plane"], "cm")
  curves = drawing.curves_chart({"loss": ([1, 2, 3], [3.0, 2.0, 1.5])}, "loss")
  gt_panel = drawing.draw_rboxes(drawing.colourize(np.zeros((8, 8))), [[4, 4, 4, 2, 0.0]], colour=(255, 255, 255))
  row = drawing.comparison_row("t", np.zeros((8, 8, 3), np.uint8), gt_panel, np.full((8, 8), 255))
  for picture in (bars, conf, curves, row):
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    assert picture.std() > 0
  assert row.shape == (16 + 14, 48, 3)   # 3 panels of 8 px at scale 2, under a 14 px title
  assert tuple(row[14 + 8, 32]) == (128, 128, 128)   # ignore (255) is grey in the prediction panel


def _results():
  def ss(miou):
    return {"miou": miou, "overall_accuracy": 0.9, "macc": 0.5, "pixels": 100,
            "iou_per_class": {"background": 0.9, "plane": miou, "ship": float("nan")},
            "accuracy_per_class": {"background": 0.95, "plane": 0.4, "ship": float("nan")},
            "confusion": [[90, 5, 0], [3, 2, 0], [0, 0, 0]]}

  def is_(ap):
    return {"segm": {"AP": ap, "ap_per_class": {"plane": ap, "ship": 0.1}}, "bbox": {"AP": ap + 0.05}}

  def rd(m):
    return {"map": m, "ap_per_class": {"plane": m, "ship": float("nan")}, "num_objects": {"plane": 3, "ship": 0},
            "images": 4}

  per_subset = {"sota": {"ss": ss(0.5), "is": is_(0.3), "rd": rd(0.6)},
                "sior": {"ss": ss(0.4), "is": is_(0.2), "rd": rd(0.7)},
                "fast": {"ss": ss(0.3), "is": is_(0.1), "rd": rd(0.2)}}
  return {"step": 80000, "checkpoint": "/run/checkpoints/80000", "mode": "eval", "eval": per_subset,
          "mtp_average": mtp_average(_headlines(per_subset))}


def _headlines(per_subset):
  tasks = _tasks()
  return {s: {t: tasks[t].headline(r) for t, r in per_task.items()} for s, per_task in per_subset.items()}


def test_mtp_average_is_the_mean_of_the_nine_headline_numbers():
  r = _results()
  assert r["mtp_average"] == pytest.approx((0.5 + 0.3 + 0.6 + 0.4 + 0.2 + 0.7 + 0.3 + 0.1 + 0.2) / 9)
  ss_only = {s: {"ss": t["ss"]} for s, t in r["eval"].items()}
  assert mtp_average(_headlines(ss_only)) is None
  broken = {**r["eval"], "fast": {**r["eval"]["fast"], "rd": {"map": float("nan")}}}
  assert math.isnan(mtp_average(_headlines(broken)))   # never silently an average of fewer numbers


def test_report_tables_pictures_and_strict_json(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  with open(workdir / "metrics.jsonl", "w") as f:
    for step in (1, 2, 3):
      f.write(json.dumps({"step": step, "loss": 3.0 / step, "ss/sota/ce": 1.0 / step}) + "\n")
    f.write(json.dumps({"step": 2, "eval/sota/ss/miou": 0.2}) + "\n")
    f.write(json.dumps({"step": 3, "eval/sota/ss/miou": 0.5}) + "\n")
  rows = {"sota": [drawing.comparison_row("sota valid 0", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)),
                                          np.zeros((8, 8)))]}
  paths = report.write_report(str(workdir), _results(), _tasks(), rows)
  text = (workdir / "report.md").read_text()
  assert "| subset | ss mIoU | is mask AP | rd rotated mAP |" in text
  assert "| sota | 50.00 | 30.00 | 60.00 |" in text and "| fast | 30.00 | 10.00 | 20.00 |" in text
  assert f"**MTP average** (mean of the 9 numbers above, MTP_SPEC §3.6): {100 * _results()['mtp_average']:.2f}" in text
  assert "| ship | n/a | n/a |" in text and "Rotated detection: DOTA mAP (VOC07, IoU 0.5) 60.00" in text
  expected = {"sota_predictions", "sota_ss_per_class", "sota_ss_confusion", "sota_is_per_class",
              "sota_rd_per_class", "fast_rd_per_class", "loss", "eval"}
  assert expected <= set(paths["pictures"])
  for name in expected:
    assert f"(report/{name}.png)" in text
  saved = json.loads((workdir / "report" / "metrics.json").read_text())   # strict JSON: NaN -> null
  assert saved["eval"]["sota"]["rd"]["ap_per_class"]["ship"] is None
  assert saved["mtp_average"] == pytest.approx(_results()["mtp_average"])
