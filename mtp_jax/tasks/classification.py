"""Task `cls`: scene classification (MTP_SPEC §5.2, mmpretrain `ImageClassifier`).

Head: global average pooling of the encoder's LAST stride-16 map (block 11 of ViT-B, 23 of
ViT-L; the classification backbone returns the raw stride-16 maps, no fpn neck) and one
`LinearClsHead` per dataset (`fc`: Linear(D, C), init normal std 0.01, bias 0, as mmpretrain).
Loss: softmax cross-entropy, mean over the images of the whole batch. Evaluation: top-1 overall
accuracy (the number MTP reports), mean per-class accuracy and the confusion matrix, summed on
the device over the evaluation split.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from mtp_jax.metrics import drawing
from mtp_jax.metrics.segmentation import ConfusionMatrix, ConfusionTotals, classification_scores
from mtp_jax.models import layers
from mtp_jax.tasks.base import Task


class ClassificationHead(nnx.Module):
  """GAP over the last stride-16 map, then `fc[subset]`: (b, H, W, D) -> (b, C_subset) logits."""

  def __init__(self, dim: int, num_classes: dict, *, rngs, dtype=None):
    self.fc = nnx.Dict({s: layers.linear(dim, n, in_axis="embed", out_axis=None, dtype=dtype, rngs=rngs,
                                         kernel_init=nnx.initializers.normal(0.01))
                        for s, n in num_classes.items()})

  def __call__(self, features, subset: str):
    pooled = features[-1].astype(jnp.float32).mean(axis=(1, 2))
    return self.fc[subset](pooled.astype(self.fc[subset].kernel.dtype)).astype(jnp.float32)


class Classification(Task):
  name = "cls"
  title = "Scene classification"
  headline_name = "OA"
  multi_scale = False   # the raw stride-16 maps, not the fpn outputs
  data_options = {"rand_augment": "augments scene-classification images"}

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"enabled": False, "weight": 1.0})

  def build_head(self, in_channels, *, rngs, dtype=None):
    return ClassificationHead(in_channels[-1], self.num_classes, rngs=rngs, dtype=dtype)

  def fields(self, train: bool) -> tuple:
    return ("label",)

  def normalizers(self, gt: dict) -> dict:
    return {s: jnp.asarray(gt[s]["label"].shape[0], jnp.float32) for s in self.subsets}

  def _logits(self, head, features, subset):
    # One subset per finetuning run; with several, each takes its interleaved rows.
    from mtp_jax.models.interleave import subset_rows  # noqa: PLC0415
    g = self.subsets.index(subset)
    feats = [subset_rows(f, len(self.subsets))[g] for f in features]
    return head(feats, subset)

  def losses(self, head, features, gt, *, train, key, normalizers):
    del train, key
    out = {}
    for s in self.subsets:
      logits = self._logits(head, features, s)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, gt[s]["label"])
      out[f"{s}/ce"] = ce.sum() / normalizers[s]
    return out

  prediction = "label"

  def predict_outputs(self, head, features, image_size):
    del image_size
    return {s: jax.nn.softmax(self._logits(head, features, s), axis=-1) for s in self.subsets}

  def eval_outputs(self, head, features, gt, image_size):
    del image_size
    sums, predictions = {}, {}
    for s in self.subsets:
      predictions[s] = jnp.argmax(self._logits(head, features, s), axis=-1).astype(jnp.int32)
      sums[s] = ConfusionMatrix.from_model_output(
          labels=gt[s]["label"], predictions=predictions[s], num_classes=self.num_classes[s],
          mask=gt[s]["is_real"])
    return sums, predictions

  def evaluator(self):
    return ConfusionTotals(self._numbers)

  def _numbers(self, subset, conf):
    r = classification_scores(conf)
    return {"overall_accuracy": r["overall_accuracy"], "mean_accuracy": r["mean_accuracy"],
            "images": int(conf.sum()),
            "accuracy_per_class": dict(zip(self.class_names[subset], r["per_class_accuracy"].tolist())),
            "confusion": conf.tolist()}

  def headline(self, result):
    return float(result["overall_accuracy"])

  def scalars(self, result):
    return {"overall_accuracy": result["overall_accuracy"], "mean_accuracy": result["mean_accuracy"]}

  def per_class(self, result):
    return "accuracy", result["accuracy_per_class"]

  def summary(self, result):
    return (f"Scene classification: top-1 OA {100 * result['overall_accuracy']:.2f}, mean class "
            f"accuracy {100 * result['mean_accuracy']:.2f}, {result['images']} images.")

  def report_pictures(self, subset, result):
    return {f"{subset}_cls_confusion": drawing.confusion_chart(
        result["confusion"], list(result["accuracy_per_class"]), f"{subset} classification")}

  def paint(self, gt_panel, pred_panel, example, prediction):
    names = self.class_names[self.subsets[0]]   # finetuning runs have one dataset
    right = int(prediction) == int(example["label"])
    return (drawing.caption(gt_panel, names[int(example["label"])]),
            drawing.caption(pred_panel, names[int(prediction)], (0, 255, 0) if right else (255, 64, 64)))
