"""RetinaNet (MTP's Xview detector, MTP_SPEC §5.2): mmdet's FPN with extra convs on the input
(against a PyTorch twin), octave anchors, the focal loss (a numpy transcription of mmdet's
`py_sigmoid_focal_loss`), targets and the test-time detections."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mtp_jax.models.detection.fpn import FPN
from mtp_jax.models.heads import retinanet


def test_fpn_with_extra_convs_on_the_input_equals_mmdets():
  rngs = nnx.Rngs(0)
  chans = (16, 24, 32, 40)
  fpn = FPN(chans, 8, 5, start_level=1, extra_on_input=True, rngs=rngs)
  rng = np.random.default_rng(0)
  maps = [rng.normal(size=(1, 32 // 2 ** i, 32 // 2 ** i, c)).astype(np.float32) for i, c in enumerate(chans)]
  ours = fpn([jnp.asarray(m) for m in maps])
  assert [o.shape[1] for o in ours] == [16, 8, 4, 2, 1] and len(fpn.fpn_convs) == 5
  assert fpn.fpn_convs[3].conv.kernel.shape == (3, 3, 40, 8)   # P6 reads the last INPUT map

  def torch_conv(conv, stride):
    m = torch.nn.Conv2d(conv.kernel.shape[2], conv.kernel.shape[3], conv.kernel.shape[0], stride, conv.kernel.shape[0] // 2)
    m.weight.data = torch.from_numpy(np.asarray(conv.kernel[...]).transpose(3, 2, 0, 1).copy())
    m.bias.data = torch.from_numpy(np.asarray(conv.bias[...]).copy())
    return m

  # mmdet FPN.forward with start_level 1, add_extra_convs='on_input', relu_before_extra_convs False
  x = [torch.from_numpy(m.transpose(0, 3, 1, 2).copy()) for m in maps]
  laterals = [torch_conv(l.conv, 1)(x[i + 1]) for i, l in enumerate(fpn.lateral_convs)]
  for i in range(len(laterals) - 1, 0, -1):
    laterals[i - 1] = laterals[i - 1] + torch.nn.functional.interpolate(laterals[i], size=laterals[i - 1].shape[2:])
  outs = [torch_conv(fpn.fpn_convs[i].conv, 1)(laterals[i]) for i in range(3)]
  outs.append(torch_conv(fpn.fpn_convs[3].conv, 2)(x[-1]))
  outs.append(torch_conv(fpn.fpn_convs[4].conv, 2)(outs[-1]))
  for o, t in zip(ours, outs):
    np.testing.assert_allclose(np.asarray(o), t.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)


def test_octave_anchors_are_mmdets():
  cfg = retinanet.RetinaConfig()
  assert cfg.num_anchors == 9 and cfg.anchors.strides == (8, 16, 32, 64, 128)
  base = cfg.anchors.base_anchors()[0]   # stride 8
  # mmdet AnchorGenerator(octave_base_scale=4, scales_per_octave=3): sides 8 x 4 x 2^(i/3) / sqrt(r)
  sides = [8 * 4 * 2 ** (i / 3) for i in range(3)]
  want = [(s / math.sqrt(r), s * math.sqrt(r)) for r in (0.5, 1.0, 2.0) for s in sides]   # (w, h), ratio-major
  np.testing.assert_allclose(np.stack([base[:, 2] - base[:, 0], base[:, 3] - base[:, 1]], 1), want, rtol=1e-5)


def mmdet_focal(pred, target, gamma=2.0, alpha=0.25):
  """mmdet's py_sigmoid_focal_loss without reduction, in numpy."""
  p = 1 / (1 + np.exp(-pred))
  pt = (1 - p) * target + p * (1 - target)
  w = (alpha * target + (1 - alpha) * (1 - target)) * pt ** gamma
  bce = np.maximum(pred, 0) - pred * target + np.log1p(np.exp(-np.abs(pred)))
  return bce * w


def test_focal_loss_is_mmdets():
  rng = np.random.default_rng(1)
  pred = rng.normal(0, 3, (50, 7)).astype(np.float32)
  target = (rng.uniform(size=(50, 7)) < 0.2).astype(np.float32)
  np.testing.assert_allclose(retinanet.sigmoid_focal_loss(jnp.asarray(pred), jnp.asarray(target), 2.0, 0.25),
                             mmdet_focal(pred.astype(np.float64), target), rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def tiny():
  head = retinanet.RetinaNet((8, 8, 8, 8), {"x": 3}, cfg=retinanet.RetinaConfig(stacked_convs=1), channels=8,
                             rngs=nnx.Rngs(0))
  rng = np.random.default_rng(2)
  features = [jnp.asarray(rng.normal(size=(2, 64 // 2 ** (i + 2), 64 // 2 ** (i + 2), 8)).astype(np.float32))
              for i in range(4)]
  return head, features


def test_classifier_starts_at_the_prior_and_losses_normalise_by_positives(tiny):
  head, features = tiny
  np.testing.assert_allclose(jax.nn.sigmoid(head.retina_cls["x"].bias[...]), 0.01, rtol=1e-5)
  gt = {"x": {"boxes": jnp.asarray([[[8.0, 8, 40, 40], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]]),
              "labels": jnp.asarray([[1, 0], [0, 0]]), "valid": jnp.asarray([[True, False], [False, False]])}}
  losses = nnx.jit(lambda h, f, g: h.losses(f, g, subsets=("x",), image_size=(64, 64), key=jax.random.key(0)))
  some = losses(head, features, gt)["x"]
  assert set(some) == {"cls", "bbox"} and float(some["bbox"]) > 0 and np.isfinite(float(some["cls"]))
  # Without objects every anchor is a negative of every class (none ignored) and the sum is
  # divided by max(positives, 1) = 1: the focal loss of all logits against 0, summed.
  empty = {"x": {**gt["x"], "valid": jnp.zeros((2, 2), bool)}}
  none = losses(head, features, empty)["x"]
  cls, _ = nnx.jit(lambda h, f: h._outputs("x", h._per_subset(f, ("x",))[1][0]))(head, features)
  np.testing.assert_allclose(float(none["cls"]), mmdet_focal(np.asarray(cls, np.float64), 0.0).sum(), rtol=1e-4)
  assert float(none["bbox"]) == 0.0


def test_detections_keep_the_best_box_per_class_once(tiny):
  head, _ = tiny
  cfg = retinanet.RetinaConfig(nms_pre=50, max_per_img=10)
  anchors = [jnp.asarray([[0.0, 0, 10, 10], [1, 0, 11, 10], [30, 30, 40, 40]]), jnp.asarray([[0.0, 0, 20, 20]])]
  cls = jnp.full((4, 2), -10.0).at[0, 0].set(3.0).at[1, 0].set(2.0).at[1, 1].set(1.0).at[2, 1].set(-2.5)
  reg = jnp.zeros((4, 4))
  det = jax.jit(lambda c, r, a: retinanet._detections_single(c, r, anchors_per_level=a, cfg=cfg, image_size=(64, 64)))(
      cls, reg, tuple(anchors))
  kept = sorted((int(l), tuple(np.asarray(b).round(3).tolist()), float(s)) for b, s, l, v in
                zip(det["hboxes"], det["scores"], det["labels"], det["valid"]) if v)
  # anchor 1 / class 0 overlaps anchor 0 / class 0 (IoU 0.82): suppressed; class 1 on anchor 1 stays;
  # anchor 2 / class 1 (sigmoid 0.076) passes 0.05; everything else is under the threshold.
  assert [k[:2] for k in kept] == [(0, (0, 0, 10, 10)), (1, (1, 0, 11, 10)), (1, (30, 30, 40, 40))]
  np.testing.assert_allclose([k[2] for k in kept], jax.nn.sigmoid(jnp.asarray([3.0, 1.0, -2.5])), rtol=1e-6)
