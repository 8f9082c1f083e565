"""Task `ss`: UperNet semantic segmentation (MTP_SPEC §3.3), its loss, evaluation and report.

Classes: index 0 is background (SAMRS gray 255 wraps to 0 through the uint8 +1, §3.4), object
class k is index k + 1; label 255 is padding and ignored. Loss: pixel-wise softmax CE, logits
bilinearly upsampled to the label size, mean over the labelled pixels of the subset in the whole
batch (mmseg). Evaluation (§3.6): confusion matrices summed on the device over the valid split,
mIoU / overall accuracy per subset with background counted (mmseg IoUMetric).
"""

import jax
import jax.numpy as jnp
import ml_collections

from mtp_jax.metrics import drawing
from mtp_jax.metrics.segmentation import ConfusionMatrix, ConfusionTotals, segmentation_scores
from mtp_jax.models.heads.upernet import UperNetHead, segmentation_loss
from mtp_jax.models.classes import with_background
from mtp_jax.tasks.base import Task

IGNORE_INDEX = 255


class SemanticSegmentation(Task):
  name = "ss"
  title = "UperNet semantic segmentation"
  headline_name = "mIoU"
  pretraining = True
  smoke = {"channels": 32}

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "enabled": True, "weight": 1.0,
        "channels": 256,    # UperNet channels in pretraining (§3.3)
        "dropout": 0.1,     # Dropout2d before each subset's predictor
        # 'batch' (the original's SyncBN, statistics per subset) or 'group' (GroupNorm: no batch
        # statistics, for small per-device batches or exact gradient accumulation).
        "norm": "batch"})

  @classmethod
  def check_config(cls, task_config):
    if task_config.norm not in ("batch", "group"):
      return f"norm {task_config.norm!r} is not 'batch' or 'group'"
    return None

  def output_names(self, subset: str) -> list:
    """Class names of the outputs: background (index 0), then the subset's object classes."""
    return ["background"] + self.class_names[subset]

  def build_head(self, in_channels, *, rngs, dtype=None):
    t = self.task_config
    # Background is output 0 (MTP_SPEC §3.1: --background adds +1 for ss only).
    return UperNetHead(in_channels, {s: with_background(n) for s, n in self.num_classes.items()},
                       channels=t.channels, dropout=t.dropout, norm=t.norm, rngs=rngs, dtype=dtype)

  def fields(self, train: bool) -> tuple:
    return ("semantic",)

  def normalizers(self, gt: dict) -> dict:
    return {s: (gt[s]["semantic"] != IGNORE_INDEX).sum() for s in self.subsets}

  def losses(self, head, features, gt, *, train, key, normalizers):
    logits = head(features, subsets=self.subsets, train=train, key=key)
    return {f"{s}/ce": segmentation_loss(logits[s], gt[s]["semantic"], IGNORE_INDEX, normalizers[s])[0]
            for s in self.subsets}

  # ---- evaluation ------------------------------------------------------------------------------
  slides = True   # evaluates by slide inference when eval.slide_window is set (dense_logits)

  def dense_logits(self, head, features, image_size):
    """{subset: (b, H, W, C) logits bilinearly upsampled to image_size (mmseg's resize)}."""
    logits = head(features, subsets=self.subsets, train=False)
    return {s: jax.image.resize(v, (v.shape[0], *image_size, v.shape[-1]), "bilinear", antialias=False)
            for s, v in logits.items()}

  prediction = "dense"

  def predict_outputs(self, head, features, image_size):
    return self.dense_logits(head, features, image_size)

  def eval_from_logits(self, logits, gt):
    """(confusion sums, argmax maps) of {subset: (b, H, W, C) logits} against gt's labels."""
    sums, maps = {}, {}
    for s in self.subsets:
      maps[s] = jnp.argmax(logits[s], axis=-1).astype(jnp.int32)
      sums[s] = ConfusionMatrix.from_model_output(
          labels=gt[s]["semantic"], predictions=maps[s], num_classes=with_background(self.num_classes[s]),
          ignore_index=IGNORE_INDEX, mask=gt[s]["is_real"])
    return sums, maps

  def eval_outputs(self, head, features, gt, image_size):
    return self.eval_from_logits(self.dense_logits(head, features, image_size), gt)

  def evaluator(self):
    return ConfusionTotals(self._numbers)

  def _numbers(self, subset, conf):
    r = segmentation_scores(conf)
    names = self.output_names(subset)
    return {"miou": r["miou"], "overall_accuracy": r["overall_accuracy"], "macc": r["macc"],
            "pixels": int(conf.sum()), "iou_per_class": dict(zip(names, r["iou"].tolist())),
            "accuracy_per_class": dict(zip(names, r["accuracy"].tolist())), "confusion": conf.tolist()}

  # ---- numbers and report ----------------------------------------------------------------------
  def headline(self, result):
    return float(result["miou"])

  def scalars(self, result):
    return {"miou": result["miou"], "overall_accuracy": result["overall_accuracy"]}

  def per_class(self, result):
    return "IoU", result["iou_per_class"]

  def class_table(self, result):
    return ["IoU", "accuracy"], [result["iou_per_class"], result["accuracy_per_class"]]

  def summary(self, result):
    return (f"Semantic segmentation: mIoU {100 * result['miou']:.2f}, overall accuracy "
            f"{100 * result['overall_accuracy']:.2f}, mean accuracy {100 * result['macc']:.2f}, "
            f"{result['pixels']} pixels.")

  def report_pictures(self, subset, result):
    return {f"{subset}_ss_confusion": drawing.confusion_chart(
        result["confusion"], list(result["iou_per_class"]), f"{subset} semantic segmentation")}

  def paint(self, gt_panel, pred_panel, example, prediction):
    return drawing.colourize(example["semantic"]), drawing.colourize(prediction)

  # ---- official full-model checkpoint (mtp_jax/checkpoints/full_model.py) ----------------------
  # Our module under heads/ss -> its official key prefix, in the official module order (first
  # match wins; `*` one name, `<s>` a subset, written as its 1-based place in data.subsets).
  official_keys = (("semsegdecoder/psp_modules/*", "semsegdecoder.decode_head.psp_modules.*.1"),
                   ("semsegdecoder", "semsegdecoder.decode_head"),
                   ("semseghead/<s>/conv_seg", "semseghead_<s>.1"))
  # UPerHead's own 1-class 1x1 classifier, never called by MTP, over the channels of our module.
  official_unused = {"semsegdecoder.decode_head.conv_seg": "semsegdecoder/fpn_bottleneck/conv"}
