"""The evaluation of a run, pretraining or finetuning, on eval.split (valid by default): per subset,
the numbers of each enabled task.

The jitted eval step runs the encoder once per batch and returns each task's (sums, per_image)
outputs (Task.eval_outputs); each task's evaluator turns them into numbers: semantic segmentation
sums confusion matrices on the device (every process gets the same counts), rotated detection
collects each image's detections on the host with the image's full ground truth (the evaluation
reader packs every instance: `reader.eval_max_instances`) and gathers them across processes.
Protocol: MTP's validation (MTP_SPEC.md §3.4, §3.6): images resized to the training size (long
side, aspect kept) and padded; padded images of the last batch are left out.

Every process runs the same number of eval steps (a process whose shards are exhausted feeds
padded batches until all are), so the collectives match on any split of the data.
"""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data_pipelines import sources
from mtp_jax.metrics import drawing
from mtp_jax.tasks import mtp_average
from mtp_jax.parallel import distributed, sharding
from mtp_jax.train.batching import check_batch_size, compile_everywhere, device_batch, task_fields
from mtp_jax.train.step import make_eval_step


def eval_fields(config, tasks: dict) -> tuple:
  """The example fields an evaluation batch carries to the device."""
  return task_fields(tasks, train=False) + ("is_real",) + (("image_hw",) if config.eval.slide_window else ())


def jit_eval_step(config, graphdef, mesh, tasks: dict):
  """eval_step (mtp_jax/train/step.py make_eval_step) jitted on `mesh`: (params, batch_stats,
  batch) -> {task: (sums replicated, per-image outputs split over the batch axes)}."""
  window, stride = config.eval.slide_window, config.eval.slide_stride
  step = make_eval_step(graphdef, tasks, (window, stride) if window else None, tuple(config.data.subsets))
  replicated, batch = NamedSharding(mesh, PartitionSpec()), sharding.batch_sharding(mesh)
  return jax.jit(sharding.traced_in_mesh(step, mesh), out_shardings={n: (replicated, batch) for n in tasks})


class Evaluation:
  """The evaluation (of `eval.split`, valid by default) of one configuration; compiled once, run at any TrainState.

  run(state, pictures) -> (results, rows, evaluators): results = {"eval": {subset: {task:
  numbers}}, "mtp_average": float | None}; rows = {subset: [drawing.comparison_row images]}
  (pictures=True); evaluators = {task: its evaluator} (for task result files).
  """

  def __init__(self, config, graphdef, mesh, tasks: dict):
    self.config, self.mesh, self.tasks = config, mesh, tasks
    self.subsets = tuple(config.data.subsets)
    self.local_batch = check_batch_size("eval.batch_per_subset", config.eval.batch_per_subset, mesh)
    self.fields = eval_fields(config, tasks)
    self.source = sources.source(config)
    self._jitted = jit_eval_step(config, graphdef, mesh, tasks)
    self._compiled = None

  def _datasets(self) -> dict:
    return {s: iter(self.source.eval_dataset(self.config, s, self.tasks, self.local_batch,
                                             self.config.eval.split))
            for s in self.subsets}

  def run(self, state, pictures: bool = False):
    iters = self._datasets()
    evaluators = {n: t.evaluator() for n, t in self.tasks.items()}
    rows, batches_done = {}, 0
    while True:
      raw = {s: next(it, None) for s, it in iters.items()}
      if not distributed.any_process(any(b is not None for b in raw.values())):
        break
      raw = {s: b if b is not None else self.source.padding_batch(self.config, s, self.tasks, self.local_batch)
             for s, b in raw.items()}
      batch = device_batch(raw, self.subsets, self.mesh, self.fields)
      if self._compiled is None:
        self._compiled = compile_everywhere(self._jitted, "eval step", state.params, state.batch_stats, batch)
      outputs = self._compiled(state.params, state.batch_stats, batch)
      for name, (sums, per_image) in outputs.items():
        evaluators[name].add(sums, per_image, raw)
      if pictures and batches_done == 0:
        rows = {s: self._rows(s, raw[s], outputs) for s in self.subsets}
      batches_done += 1
      if self.config.eval.max_batches and batches_done >= self.config.eval.max_batches:
        break
    for it in iters.values():
      it.close()
    per_task = {n: e.results() for n, e in evaluators.items()}
    per_subset = {s: {n: per_task[n][s] for n in self.tasks if s in per_task[n]} for s in self.subsets}
    per_subset = {s: r for s, r in per_subset.items() if r}
    headlines = {s: {n: self.tasks[n].headline(r) for n, r in r_s.items()} for s, r_s in per_subset.items()}
    return {"eval": per_subset, "mtp_average": mtp_average(headlines)}, rows, evaluators

  def _rows(self, subset: str, raw: dict, outputs: dict) -> list:
    """The first `eval.report_images` real images of this process's batch: image | ground truth
    | prediction, each task painting its part (Task.paint) in task order."""
    predictions = {n: jax.tree.map(sharding.local_rows, per_image[subset])
                   for n, (_, per_image) in outputs.items() if subset in per_image}
    out = []
    for i in np.flatnonzero(raw["is_real"])[:self.config.eval.report_images]:
      example = {k: v[i] for k, v in raw.items()}
      rgb = tuple(self.config.model.rgb_bands)   # multispectral images: drawn from these bands
      example["image"] = (np.stack([drawing.display_rgb(d, rgb) for d in example["image"]])
                          if example["image"].ndim == 4 else drawing.display_rgb(example["image"], rgb))
      gt_panel = pred_panel = example["image"]
      for n, task in self.tasks.items():
        if n in predictions:
          gt_panel, pred_panel = task.paint(gt_panel, pred_panel, example,
                                            jax.tree.map(lambda x: x[i], predictions[n]))
      image = example["image"]
      if image.ndim == 4:   # the dates of a change-detection pair, side by side
        image = np.concatenate(list(image), axis=1)
      out.append(drawing.comparison_row(f"{subset} {self.config.eval.split} {len(out)}", image, gt_panel,
                                        pred_panel))
    return out


def eval_scalars(results: dict, tasks: dict) -> dict:
  """Flat scalars for the metric writers: eval/<subset>/<task>/<metric>, eval/mtp_average."""
  out = {}
  for s, per_task in results["eval"].items():
    for t, r in per_task.items():
      for metric, value in tasks[t].scalars(r).items():
        out[f"eval/{s}/{t}/{metric}"] = value
  if results.get("mtp_average") is not None:
    out["eval/mtp_average"] = results["mtp_average"]
  return out


def summary_lines(results: dict, step: int, tasks: dict) -> list[str]:
  """One console line per subset (headline numbers in %), and the MTP average."""
  lines = []
  for s, per_task in results["eval"].items():
    shown = [f"{t} {tasks[t].headline_name} {100 * tasks[t].headline(r):.2f}" for t, r in per_task.items()]
    lines.append(f"eval step {step} {s}: " + ", ".join(shown))
  if results.get("mtp_average") is not None:
    lines.append(f"eval step {step}: MTP average {100 * results['mtp_average']:.2f}")
  return lines
