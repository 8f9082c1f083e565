"""Task `cd`: binary change detection (MTP_SPEC §5.2, open-cd `SiamEncoderDecoder`).

Both dates of an example go through the shared encoder in one pass (the model's images are
(b*G, T = 2, S, S, C); mtp_jax/models/multitask.py); its four raw stride-16 maps are fused by
`FeatureFusionNeck(policy='abs_diff')`, |f1 - f2|, and decoded by the UNet head
(mtp_jax/models/heads/unet.py). Labels: 0 unchanged, 1 changed, 255 ignored. Loss: pixel-wise
CE over the labelled pixels of the whole batch. Evaluation: a confusion matrix summed on the
device; the headline is the F1 of the changed class (mmseg IoUMetric's per-class Fscore), with
its precision, recall and IoU.
"""

import jax.numpy as jnp
import ml_collections
import numpy as np

from mtp_jax.metrics import drawing
from mtp_jax.metrics.segmentation import ConfusionMatrix, ConfusionTotals, change_detection_scores
from mtp_jax.models.heads.unet import UNetHead
from mtp_jax.models.heads.upernet import resize_bilinear, segmentation_loss
from mtp_jax.tasks.base import Task

IGNORE_INDEX = 255
DATES = 2


def fuse_dates(features, groups: int):
  """[(b*G*T, h, w, D)] rows (image r, date t at r*T + t) -> [(b*G, h, w, D)] |f1 - f2|."""
  out = []
  for f in features:
    pairs = f.reshape(f.shape[0] // DATES, DATES, *f.shape[1:])
    out.append(jnp.abs(pairs[:, 0] - pairs[:, 1]))
  return out


class ChangeDetection(Task):
  name = "cd"
  title = "Change detection"
  headline_name = "F1"
  multi_scale = False   # the raw stride-16 maps (open-cd's ViT backbones return those)
  dates = DATES
  # The pairs enter at the release's tile size (padded) unless data.resize resizes them first.
  native_size = True
  data_options = {"resize": "resizes change-detection pairs"}
  smoke = {"decoder_channels": (64, 32, 32, 16)}

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"enabled": False, "weight": 1.0,
                                      "decoder_channels": (512, 256, 128, 64), "dropout": 0.1})

  def output_names(self, subset):
    return ["unchanged", "changed"]

  def build_head(self, in_channels, *, rngs, dtype=None):
    t = self.task_config
    return UNetHead(in_channels, {s: 2 for s in self.subsets}, decoder_channels=tuple(t.decoder_channels),
                    dropout=t.dropout, rngs=rngs, dtype=dtype)

  def fields(self, train: bool) -> tuple:
    return ("semantic",)

  def normalizers(self, gt):
    return {s: (gt[s]["semantic"] != IGNORE_INDEX).sum() for s in self.subsets}

  def _logits(self, head, features, train, key=None):
    return head(fuse_dates(features, len(self.subsets)), subsets=self.subsets, train=train, key=key)

  def losses(self, head, features, gt, *, train, key, normalizers):
    logits = self._logits(head, features, train, key)
    return {f"{s}/ce": segmentation_loss(logits[s], gt[s]["semantic"], IGNORE_INDEX, normalizers[s])[0]
            for s in self.subsets}

  prediction = "dense"

  def predict_outputs(self, head, features, image_size):
    """{subset: (b, H, W, 2) logits (unchanged, changed) bilinearly upsampled to image_size}."""
    logits = self._logits(head, features, train=False)
    return {s: resize_bilinear(v.astype(jnp.float32), *image_size) for s, v in logits.items()}

  def eval_outputs(self, head, features, gt, image_size):
    """Scored at the labels' size: the input size, or with eval.label_size the labels as
    converted, the logits bilinearly resized to them (mmseg's postprocess_result)."""
    logits = self.predict_outputs(head, features, image_size)
    sums, maps = {}, {}
    for s in self.subsets:
      label_hw = gt[s]["semantic"].shape[1:3]
      if tuple(label_hw) != tuple(logits[s].shape[1:3]):
        logits[s] = resize_bilinear(logits[s], *label_hw)
      maps[s] = jnp.argmax(logits[s], axis=-1).astype(jnp.int32)
      sums[s] = ConfusionMatrix.from_model_output(labels=gt[s]["semantic"], predictions=maps[s],
                                                  num_classes=2, ignore_index=IGNORE_INDEX,
                                                  mask=gt[s]["is_real"])
    return sums, maps

  def evaluator(self):
    return ConfusionTotals(lambda subset, conf: {**change_detection_scores(conf), "pixels": int(conf.sum()),
                                                 "confusion": conf.tolist()})

  def headline(self, result):
    return float(result["f1"])

  def scalars(self, result):
    return {k: result[k] for k in ("f1", "precision", "recall", "iou", "overall_accuracy")}

  def summary(self, result):
    return (f"Change detection: F1 (changed) {100 * result['f1']:.2f}, precision "
            f"{100 * result['precision']:.2f}, recall {100 * result['recall']:.2f}, IoU "
            f"{100 * result['iou']:.2f}, {result['pixels']} pixels.")

  def report_pictures(self, subset, result):
    return {f"{subset}_cd_confusion": drawing.confusion_chart(result["confusion"], ["unchanged", "changed"],
                                                              f"{subset} change detection")}

  def paint(self, gt_panel, pred_panel, example, prediction):
    """The label and predicted maps, coloured, at the input's size (the panels start as the
    pair's (2, S, S, 3) images; labels scored at their converted size, eval.label_size, are
    stretched to S by nearest neighbour)."""
    height, width = gt_panel.shape[-3:-1]

    def panel(label_map):
      rows = np.arange(height) * label_map.shape[0] // height
      cols = np.arange(width) * label_map.shape[1] // width
      return drawing.colourize(np.asarray(label_map)[rows][:, cols])

    return panel(example["semantic"]), panel(prediction)
