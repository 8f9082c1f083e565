"""Pretraining evaluation on the valid split: per subset, the numbers of each configured task.

Semantic segmentation is scored on device: the jitted eval step returns each subset's
`ConfusionMatrix` over the global batch (every process gets the same counts), summed on the host
in int64. Protocol: MTP's validation (MTP_SPEC.md §3.4, §3.6): images resized to the training
size (long side, aspect kept) and padded; the padding (label 255) and the padded images of the
last batch are left out; background is class 0 and counts in the mIoU.

Every process runs the same number of eval steps (a process whose shards are exhausted feeds
padded batches until all are), so the collectives match on any split of the data.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from data_pipelines.samrs import reader
from data_pipelines.samrs.classes import subset as subset_layout
from mtp_jax.metrics import drawing
from mtp_jax.metrics.multitask import HEADLINE, HEADLINE_NAMES, headline, mtp_average
from mtp_jax.metrics.segmentation import segmentation_scores
from mtp_jax.parallel import distributed, sharding
from mtp_jax.train.batching import check_batch_size, compile_everywhere, device_batch
from mtp_jax.train.step import make_eval_step


def _gathered(x) -> np.ndarray:
  """This process's rows -> every process's rows (process order), as numpy."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class PretrainEvaluation:
  """The valid-split evaluation of one configuration; compiled once, run at any TrainState.

  run(state, pictures) -> (results, rows): results = {"eval": {subset: {task: numbers}},
  "mtp_average": float | None}; rows = {subset: [drawing.comparison_row images]} (pictures=True).
  """

  def __init__(self, config, graphdef, mesh, num_classes: dict):
    self.config, self.mesh = config, mesh
    self.subsets = tuple(config.data.subsets)
    self.local_batch = check_batch_size("eval.batch_per_subset", config.eval.batch_per_subset, mesh)
    self.classes = {s: ["background"] + list(subset_layout(s).classes) for s in self.subsets}
    step = make_eval_step(graphdef, self.subsets, {s: num_classes[s] + 1 for s in self.subsets})
    self._jitted = jax.jit(step, out_shardings=(sharding.batch_sharding(mesh),
                                                NamedSharding(mesh, PartitionSpec())))
    self._compiled = None

  def _datasets(self) -> dict:
    c = self.config
    return {s: iter(reader.make_dataset(
        c.data.dir, s, "valid", image_size=c.data.image_size, max_instances=c.data.max_instances[s],
        batch_size=self.local_batch, train=False, process_index=jax.process_index(),
        process_count=jax.process_count(), max_corrupt_fraction=c.data.max_corrupt_fraction))
        for s in self.subsets}

  def run(self, state, pictures: bool = False):
    iters = self._datasets()
    totals = {s: None for s in self.subsets}
    rows, batches_done = {}, 0
    while True:
      raw = {s: next(it, None) for s, it in iters.items()}
      if not distributed.any_process(any(b is not None for b in raw.values())):
        break
      raw = {s: b if b is not None else self._padding(s) for s, b in raw.items()}
      batch = device_batch(raw, self.subsets, self.mesh, keys=("image", "semantic", "is_real"))
      if self._compiled is None:
        self._compiled = compile_everywhere(self._jitted, "eval step", state.params, state.batch_stats, batch)
      preds, confusions = self._compiled(state.params, state.batch_stats, batch)
      for s in self.subsets:
        host = confusions[s].to_host()
        totals[s] = host if totals[s] is None else totals[s].merge(host)
      if pictures and batches_done == 0:
        rows = {s: self._rows(s, raw[s], preds[s]) for s in self.subsets}
      batches_done += 1
      if self.config.eval.max_batches and batches_done >= self.config.eval.max_batches:
        break
    for it in iters.values():
      it.close()
    per_subset = {s: {"ss": self._segmentation(s, totals[s].compute())} for s in self.subsets
                  if totals[s] is not None}
    return {"eval": per_subset, "mtp_average": mtp_average(per_subset)}, rows

  def _padding(self, subset: str) -> dict:
    """A batch of padded examples (is_real False) for a subset whose data ran out here."""
    b, size, m = self.local_batch, self.config.data.image_size, self.config.data.max_instances[subset]
    return {"image": np.zeros((b, size, size, 3), np.uint8), "semantic": np.full((b, size, size), 255, np.uint8),
            "is_real": np.zeros((b,), bool), "rboxes": np.zeros((b, m, 5), np.float32),
            "rbox_valid": np.zeros((b, m), bool)}

  def _segmentation(self, subset: str, conf: np.ndarray) -> dict:
    r = segmentation_scores(conf)
    names = self.classes[subset]
    return {"miou": r["miou"], "overall_accuracy": r["overall_accuracy"], "macc": r["macc"],
            "pixels": int(conf.sum()), "iou_per_class": dict(zip(names, r["iou"].tolist())),
            "accuracy_per_class": dict(zip(names, r["accuracy"].tolist())), "confusion": conf.tolist()}

  def _rows(self, subset: str, raw: dict, preds) -> list:
    """The first `eval.report_images` real images of the batch: image | GT (with its rotated
    boxes) | predicted map."""
    preds = _gathered(preds)
    keys = ("image", "semantic", "rboxes", "rbox_valid", "is_real")
    data = {k: _gathered(raw[k]) for k in keys}
    out = []
    for i in np.flatnonzero(data["is_real"])[:self.config.eval.report_images]:
      boxes = data["rboxes"][i][data["rbox_valid"][i]]
      out.append(drawing.comparison_row(f"{subset} valid {len(out)}", data["image"][i], data["semantic"][i],
                                        preds[i], gt_rboxes=boxes))
    return out


def eval_scalars(results: dict) -> dict:
  """Flat scalars for the metric writers: eval/<subset>/<task>/<headline>, ss overall accuracy,
  eval/mtp_average."""
  out = {}
  for s, per_task in results["eval"].items():
    for t, r in per_task.items():
      out[f"eval/{s}/{t}/{'_'.join(HEADLINE[t])}"] = headline(t, r)
    if "ss" in per_task:
      out[f"eval/{s}/ss/overall_accuracy"] = per_task["ss"]["overall_accuracy"]
  if results.get("mtp_average") is not None:
    out["eval/mtp_average"] = results["mtp_average"]
  return out


def summary_lines(results: dict, step: int) -> list[str]:
  """One console line per subset (headline numbers in %), and the MTP average."""
  lines = []
  for s, per_task in results["eval"].items():
    shown = [f"{t} {HEADLINE_NAMES[t]} {100 * headline(t, r):.2f}" for t, r in per_task.items()]
    if "ss" in per_task:
      shown.append(f"pixel accuracy {100 * per_task['ss']['overall_accuracy']:.2f}")
    lines.append(f"eval step {step} {s}: " + ", ".join(shown))
  if results.get("mtp_average") is not None:
    lines.append(f"eval step {step}: MTP average {100 * results['mtp_average']:.2f}")
  return lines
