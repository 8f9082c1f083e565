"""FPN neck and RPN (targets, losses, proposals) against hand-made cases and numpy transcriptions
of the mmdet / mmrotate formulas (mtp_jax/models/detection)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp_jax.models.detection import fpn as fpn_lib
from mtp_jax.models.detection import rpn as rpn_lib
from mtp_jax.models.detection.rpn import ProposalConfig, RPNConfig
from mtp_jax.ops.boxes import rbox_to_hbox

# Jitted entry points (eager dispatch of the many small ops is far slower on CPU than compiling).
targets_jit = jax.jit(rpn_lib.rpn_targets, static_argnames="cfg")
batch_targets_jit = jax.jit(rpn_lib.batch_rpn_targets, static_argnames="cfg")
loss_jit = jax.jit(rpn_lib.rpn_loss, static_argnames="cfg")
proposals_jit = jax.jit(rpn_lib.rpn_proposals, static_argnames=("cfg", "train"))


# ----------------------------------------------------------------------------------------------
# numpy references

def conv_np(x, kernel, bias):
  """(H, W, Cin) * (k, k, Cin, Cout) + bias, stride 1, zero padding k // 2 (PyTorch Conv2d)."""
  k = kernel.shape[0]
  pad = k // 2
  xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
  h, w = x.shape[:2]
  out = np.zeros((h, w, kernel.shape[-1]))
  for i in range(k):
    for j in range(k):
      out += np.einsum("hwc,co->hwo", xp[i:i + h, j:j + w], kernel[i, j])
  return out + bias


def nearest_np(x, h, w):
  """F.interpolate(size=(h, w), mode='nearest'): src = floor(dst * in / out)."""
  rows = [(r * x.shape[0]) // h for r in range(h)]
  cols = [(c * x.shape[1]) // w for c in range(w)]
  return x[rows][:, cols]


def fpn_np(features, params):
  """mmdet FPN.forward, no extra convs: laterals, top-down nearest adds, fpn convs, pool(1, 2)."""
  lat = [conv_np(f, *params["lateral"][i]) for i, f in enumerate(features)]
  for i in range(len(lat) - 1, 0, -1):
    lat[i - 1] = lat[i - 1] + nearest_np(lat[i], *lat[i - 1].shape[:2])
  outs = [conv_np(l, *params["fpn"][i]) for i, l in enumerate(lat)]
  while len(outs) < params["num_outs"]:
    outs.append(outs[-1][::2, ::2])
  return outs


def sigmoid_bce_np(logits, labels):
  """F.binary_cross_entropy_with_logits(reduction='none'), float64."""
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  return -(labels * np.log(p) + (1 - labels) * np.log(1 - p))


def smooth_l1_np(pred, target, beta):
  diff = np.abs(pred.astype(np.float64) - target)
  return np.where(diff < beta, 0.5 * diff ** 2 / beta, diff - 0.5 * beta)


def midpoint_encode_np(anchor, corners, stds=(1, 1, 1, 1, 0.5, 0.5)):
  """mmrotate MidpointOffsetCoder.encode from an explicit (4, 2) polygon of the gt."""
  px, py = (anchor[0] + anchor[2]) / 2, (anchor[1] + anchor[3]) / 2
  pw, ph = anchor[2] - anchor[0], anchor[3] - anchor[1]
  xs, ys = corners[:, 0], corners[:, 1]
  x1, y1, x2, y2 = xs.min(), ys.min(), xs.max(), ys.max()
  gx, gy, gw, gh = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
  ga = xs[np.abs(ys - y1) <= 0.1].max()
  gb = ys[np.abs(xs - x2) <= 0.1].max()
  d = np.array([(gx - px) / pw, (gy - py) / ph, np.log(gw / pw), np.log(gh / ph),
                (ga - gx) / gw, (gb - gy) / gh])
  return d / np.asarray(stds)


def hbox_iou_np(a, b):
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
  return inter / (area(a) + area(b) - inter)


# ----------------------------------------------------------------------------------------------
# FPN

def test_fpn_matches_numpy_reference_with_odd_sizes():
  rngs = nnx.Rngs(0)
  in_channels, out = (3, 5, 4), 6
  model = fpn_lib.FPN(in_channels, out, num_outs=5, rngs=rngs)
  sizes = [(7, 9), (4, 5), (2, 3)]    # odd sizes: the top-down resize is not an exact 2x
  key = jax.random.key(1)
  feats = [jax.random.normal(k, (2, h, w, c)) for k, (h, w), c in
           zip(jax.random.split(key, 3), sizes, in_channels)]
  # Non-zero biases, so the reference also checks where they are added.
  for conv in list(model.lateral_convs) + list(model.fpn_convs):
    conv.conv.bias[...] = jnp.linspace(-1, 1, out)
  outs = nnx.jit(lambda m, x: m(x))(model, feats)
  assert [o.shape for o in outs] == [(2, 7, 9, 6), (2, 4, 5, 6), (2, 2, 3, 6), (2, 1, 2, 6),
                                     (2, 1, 1, 6)]
  params = {"lateral": [(np.asarray(c.conv.kernel[...]), np.asarray(c.conv.bias[...]))
                        for c in model.lateral_convs],
            "fpn": [(np.asarray(c.conv.kernel[...]), np.asarray(c.conv.bias[...]))
                    for c in model.fpn_convs], "num_outs": 5}
  for b in range(2):
    ref = fpn_np([np.asarray(f[b], np.float64) for f in feats], params)
    for level, (got, want) in enumerate(zip(outs, ref)):
      np.testing.assert_allclose(got[b], want, rtol=1e-4, atol=1e-4, err_msg=f"level {level}")


def test_fpn_init_and_names():
  model = fpn_lib.FPN((8, 16), 4, num_outs=2, rngs=nnx.Rngs(0))
  names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert names == {f"{m}.{i}.conv.{w}" for m in ("lateral_convs", "fpn_convs") for i in (0, 1)
                   for w in ("kernel", "bias")}
  for conv, fan in ((model.lateral_convs[1].conv, 16 + 4), (model.fpn_convs[0].conv, 9 * (4 + 4))):
    kernel = np.asarray(conv.kernel[...])
    bound = math.sqrt(6 / fan)                            # Xavier uniform, gain 1
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.7 * bound
    assert not np.asarray(conv.bias[...]).any()
  # init='mtp': ConvModule's kaiming normal (fan_out), which MTP keeps (no init_weights() call).
  model = fpn_lib.FPN((8,), 64, 1, rngs=nnx.Rngs(0), init="mtp")
  kernel = np.asarray(model.fpn_convs[0].conv.kernel[...])
  assert abs(kernel.std() / math.sqrt(2 / (64 * 9)) - 1) < 0.05


def test_resize_nearest_matches_torch():
  torch = pytest.importorskip("torch")
  x = np.arange(2 * 5 * 7 * 1, dtype=np.float32).reshape(2, 5, 7, 1)
  for h, w in ((10, 14), (9, 13), (3, 4), (5, 7)):
    want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(h, w),
                                           mode="nearest").permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(fpn_lib.resize_nearest(jnp.asarray(x), h, w), want)


# ----------------------------------------------------------------------------------------------
# RPN head

def test_rpn_head_layout_and_init():
  head = rpn_lib.RPNHead(8, 3, 6, rngs=nnx.Rngs(0))
  levels = [jax.random.normal(jax.random.key(i), (2, s, s + 1, 8)) for i, s in enumerate((4, 2))]
  cls, reg = nnx.jit(lambda m, x: m(x))(head, levels)
  n0, n1 = 4 * 5 * 3, 2 * 3 * 3
  assert cls.shape == (2, n0 + n1) and reg.shape == (2, n0 + n1, 6)
  level1 = nnx.jit(lambda m, x: (m.rpn_cls(jax.nn.relu(m.rpn_conv(x))),
                                  m.rpn_reg(jax.nn.relu(m.rpn_conv(x)))))(head, levels[1])
  y, x, a = 1, 2, 1                                       # anchor (y * W + x) * A + a of level 1
  k = n0 + (y * 3 + x) * 3 + a
  np.testing.assert_allclose(cls[1, k], level1[0][1, y, x, a], rtol=1e-5)
  np.testing.assert_allclose(reg[1, k], level1[1][1, y, x, a * 6:(a + 1) * 6], rtol=1e-5)
  kernel = np.asarray(head.rpn_conv.kernel[...])
  assert 0.008 < kernel.std() < 0.012 and not np.asarray(head.rpn_reg.bias[...]).any()
  torch_like = rpn_lib.RPNHead(8, 3, 6, rngs=nnx.Rngs(0), init="mtp").rpn_conv   # PyTorch default
  bound = 1 / math.sqrt(8 * 9)
  for value in (torch_like.kernel[...], torch_like.bias[...]):
    assert 0.7 * bound < np.abs(np.asarray(value)).max() <= bound


# ----------------------------------------------------------------------------------------------
# RPN targets

def square_45(cx, cy, side):
  """Corners of a side x side square turned by 45 degrees (top, right, bottom, left)."""
  r = side / math.sqrt(2)
  return np.array([[cx, cy - r], [cx + r, cy], [cx, cy + r], [cx - r, cy]])


def test_rpn_targets_hand_made_image():
  """Positive, negative, border-ignored, invalid and low-quality anchors, oriented RPN config."""
  cfg = RPNConfig()
  anchors = np.array([
      [10, 10, 30, 30],     # 0: = gt0's box, IoU 1                  -> positive (gt0)
      [12, 10, 32, 30],     # 1: IoU 360 / 440 = 0.82 with gt0       -> positive (gt0)
      [40, 40, 60, 60],     # 2: IoU 0 (the padding gt sits on it)   -> negative
      [-1, 40, 19, 60],     # 3: IoU 0.90 with gt2 but x1 < 0        -> ignored (border)
      [35, 10, 60, 35],     # 4: IoU 0.46 with gt1's enclosing box, gt1's best -> positive (low q.)
      [30, 5, 60, 40],      # 5: IoU 0.27 with gt1's enclosing box   -> negative
      [10, 10, 30, 30],     # 6: like 0 but not a valid anchor       -> ignored
  ], np.float32)
  anchor_valid = np.array([1, 1, 1, 1, 1, 1, 0], bool)
  gt = np.array([[20, 20, 20, 20, 0.0],              # gt0: axis-aligned square
                 [45, 20, 12, 12, math.pi / 4],      # gt1: square turned by 45 degrees
                 [10, 50, 20, 20, 0.0],              # gt2: at the left border
                 [50, 50, 20, 20, 0.0]], np.float32)  # padding slot, exactly on anchor 2
  gt_valid = np.array([1, 1, 1, 0], bool)
  r = 6 * math.sqrt(2)                               # half diagonal of gt1
  hull1 = [45 - r, 20 - r, 45 + r, 20 + r]
  assert hbox_iou_np(anchors[4], hull1) == pytest.approx(0.4608, abs=1e-3)   # in [0.3, 0.7)
  assert hbox_iou_np(anchors[5], hull1) == pytest.approx(0.2743, abs=1e-3)   # < 0.3
  t = targets_jit(anchors, anchor_valid, gt, gt_valid, jax.random.key(0), cfg, (64, 64))
  np.testing.assert_array_equal(t.labels, [1, 1, 0, 0, 1, 0, 0])
  np.testing.assert_array_equal(t.label_weights, [1, 1, 1, 0, 1, 1, 0])
  assert int(t.num_pos) == 3 and int(t.num_neg) == 2
  np.testing.assert_array_equal(t.bbox_weights, np.repeat(np.array([[1, 1, 0, 0, 1, 0, 0]]).T, 6, 1))
  square0 = np.array([[10, 10], [30, 10], [30, 30], [10, 30]], np.float64)
  want = np.zeros((7, 6))
  want[0] = midpoint_encode_np(anchors[0], square0)          # [0, 0, 0, 0, 1, 1]
  want[1] = midpoint_encode_np(anchors[1], square0)          # dx = -0.1
  want[4] = midpoint_encode_np(anchors[4], square_45(45, 20, 12))
  np.testing.assert_allclose(want[0], [0, 0, 0, 0, 1, 1], atol=1e-12)
  np.testing.assert_allclose(t.bbox_targets, want, atol=2e-5)
  # Without the border test anchor 3 becomes a positive of gt2.
  t = targets_jit(anchors, anchor_valid, gt, gt_valid, jax.random.key(0),
                          dataclasses.replace(cfg, allowed_border=-1), (64, 64))
  np.testing.assert_array_equal(t.labels, [1, 1, 0, 1, 1, 0, 0])


def test_rpn_targets_sample_counts():
  cfg = RPNConfig()
  rng = np.random.default_rng(0)
  gt = np.array([[100, 100, 40, 40, 0.0]], np.float32)
  jitter = rng.uniform(-1, 1, (600, 4)).astype(np.float32)
  near = np.array([80, 80, 120, 120], np.float32) + jitter      # IoU > 0.9: all positive
  far = np.array([150, 150, 190, 190], np.float32) + jitter     # IoU 0: all negative
  image = (256, 256)

  anchors = np.concatenate([near, far])
  index = np.arange(1200)

  def counts(anchor_valid, gt_valid, key=0):   # subsets by anchor_valid: one compile for all
    t = targets_jit(anchors, anchor_valid, gt, gt_valid, jax.random.key(key), cfg, image)
    assert int(t.labels.sum()) == int(t.num_pos) == int((t.bbox_weights[:, 0] > 0).sum())
    assert int(t.label_weights.sum()) == int(t.num_pos) + int(t.num_neg)
    assert not np.asarray(t.label_weights)[~anchor_valid].any()
    return int(t.num_pos), int(t.num_neg), np.asarray(t.label_weights)

  every = np.ones(1200, bool)
  YES, NO = np.array([True]), np.array([False])
  assert counts(every, YES)[:2] == (128, 128)                # pos capped at 256 * 0.5
  assert counts((index < 3) | (index >= 600), YES)[:2] == (3, 253)
  assert counts((index < 3) | ((index >= 600) & (index < 605)), YES)[:2] == (3, 5)
  assert counts(every, NO)[:2] == (0, 256)                 # no valid gt: all negative
  a, b = counts(every, YES, 1)[2], counts(every, YES, 2)[2]
  assert (a != b).any()                                         # the key drives the sampler
  t = targets_jit(anchors, every, np.zeros((0, 5), np.float32), np.zeros(0, bool),
                  jax.random.key(0), cfg, image)               # no gt slots at all
  assert (int(t.num_pos), int(t.num_neg)) == (0, 256)


# ----------------------------------------------------------------------------------------------
# Losses

def loss_np(cls, reg, t, cfg):
  """mmdet loss_by_feat: sums over sampled anchors / positive coords, / (num sampled + eps)."""
  avg = float(np.sum(t.num_pos) + np.sum(t.num_neg))
  denom = avg + np.finfo(np.float32).eps
  w = np.asarray(t.label_weights)
  loss_cls = (sigmoid_bce_np(np.asarray(cls), np.asarray(t.labels)) * w).sum() / denom
  if cfg.bbox_loss == "smooth_l1":
    per = smooth_l1_np(np.asarray(reg), np.asarray(t.bbox_targets), cfg.beta)
  else:
    per = np.abs(np.asarray(reg, np.float64) - np.asarray(t.bbox_targets))
  return loss_cls, (per * np.asarray(t.bbox_weights)).sum() / denom


@pytest.mark.parametrize("name", ["oriented", "mask_rcnn"])
def test_rpn_loss_matches_numpy(name):
  cfg = RPNConfig() if name == "oriented" else rpn_lib.MASK_RCNN_RPN
  gen = cfg.anchors
  sizes = gen.feature_sizes((64, 64))
  anchors = jnp.concatenate(gen.grid_anchors(sizes))
  valid = jnp.concatenate(gen.valid_flags(sizes, (64, 64)))
  gt = np.array([[[24, 24, 30, 20, 0.4], [44, 40, 36, 24, -1.0], [0, 0, 0, 0, 0]],
                 [[32, 32, 40, 40, 0.0], [12, 50, 20, 16, 0.2], [50, 14, 24, 24, 1.2]]], np.float32)
  gt_valid = np.array([[1, 1, 0], [1, 1, 1]], bool)
  if not cfg.rotated:
    gt = np.asarray(rbox_to_hbox(gt))
  t = batch_targets_jit(anchors, valid, gt, gt_valid, jax.random.key(3), cfg,
                                [[64, 64], [60, 64]])
  assert (np.asarray(t.num_pos) > 0).all() and (np.asarray(t.num_neg) > 0).all()
  n = anchors.shape[0]
  cls = jax.random.normal(jax.random.key(4), (2, n)) * 3
  # Targets plus noise on both sides of beta = 1/9, so both SmoothL1 branches are exercised.
  reg = t.bbox_targets + jax.random.normal(jax.random.key(5), t.bbox_targets.shape) * 0.2
  got = loss_jit(cls, reg, t, cfg=cfg)
  want_cls, want_bbox = loss_np(cls, reg, t, cfg)
  np.testing.assert_allclose(got["rpn_cls"], want_cls, rtol=1e-5)
  np.testing.assert_allclose(got["rpn_bbox"], want_bbox, rtol=1e-5)
  diff = np.abs(np.asarray(reg - t.bbox_targets))[np.asarray(t.bbox_weights) > 0]
  assert (diff < 1 / 9).any() and (diff > 1 / 9).any()
  # An explicit avg_factor (micro-batches) replaces the batch count.
  half = loss_jit(cls, reg, t, cfg=cfg, avg_factor=2 * int(t.label_weights.sum()))
  np.testing.assert_allclose(half["rpn_cls"], got["rpn_cls"] / 2, rtol=1e-5)


def test_rpn_loss_hand_values():
  """One positive (logit 0, deltas off by 0.05 and 1) and one negative (logit log 3)."""
  t = rpn_lib.RPNTargets(labels=jnp.array([[1, 0, 0]]), label_weights=jnp.array([[1.0, 1.0, 0.0]]),
                         bbox_targets=jnp.zeros((1, 3, 4)),
                         bbox_weights=jnp.array([[[1.0] * 4, [0.0] * 4, [0.0] * 4]]),
                         num_pos=jnp.array([1]), num_neg=jnp.array([1]))
  cls = jnp.array([[0.0, math.log(3), 50.0]])              # the unsampled anchor must not count
  reg = jnp.array([[[0.05, 1.0, 0, 0], [9, 9, 9, 9], [9, 9, 9, 9]]])
  got = rpn_lib.rpn_loss(cls, reg, t, cfg=RPNConfig.mask_rcnn(bbox_loss="smooth_l1"))
  # BCE: log 2 + log(1 + 3); SmoothL1(1/9): 0.5 * 0.05^2 * 9 + (1 - 1/18).
  np.testing.assert_allclose(got["rpn_cls"], (math.log(2) + math.log(4)) / 2, rtol=1e-6)
  np.testing.assert_allclose(got["rpn_bbox"], (0.5 * 0.0025 * 9 + 1 - 1 / 18) / 2, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Proposals

LEVEL0 = np.array([[50, 50, 50, 52],     # logit 4: zero width -> dropped (w > min_bbox_size 0)
                   [0, 0, 10, 10],       # logit 3: kept
                   [0, 0, 10, 10.5],     # logit 2.5: IoU 0.95 with the previous -> suppressed
                   [30, 30, 40, 40],     # logit 1: not among the level's 3 best -> never seen
                   [52, 2, 60, 8]], np.float32)   # logit -1: not among the 3 best
LEVEL1 = np.array([[0, 0, 10, 10.2],     # logit 2.8: overlaps level 0's box, other level -> kept
                   [20, 20, 30, 30],     # logit 0.5: kept
                   [20, 20, 30, 30.1]], np.float32)   # logit 0.4: suppressed by the previous
LOGITS = np.array([4, 3, 2.5, 1, -1, 2.8, 0.5, 0.4], np.float32)


def proposal_case(cfg):
  anchors = [jnp.asarray(LEVEL0), jnp.asarray(LEVEL1)]
  cls = jnp.asarray(np.stack([LOGITS, LOGITS]))
  if cfg.rotated:   # da = db = 0.5 (delta 1 at std 0.5) decodes the anchor box itself
    reg = jnp.tile(jnp.array([0, 0, 0, 0, 1.0, 1.0]), (2, 8, 1))
  else:
    reg = jnp.zeros((2, 8, 4))
  return cls, reg, anchors


@pytest.mark.parametrize("rotated", [False, True])
def test_rpn_proposals_hand_made(rotated):
  base = RPNConfig() if rotated else RPNConfig.mask_rcnn()
  sig = lambda x: 1 / (1 + np.exp(-x))
  for max_per_img in ((6,) if rotated else (2, 6)):   # the cap itself: horizontal only
    cfg = dataclasses.replace(base, test_proposals=ProposalConfig(3, max_per_img, 0.8, 0.0),
                              train_proposals=ProposalConfig(1, 1, 0.8, -1.0))
    cls, reg, anchors = proposal_case(cfg)
    image = np.array([[64, 64], [28, 64]], np.float32)     # image 1 clips y2 to 28 (horizontal)
    boxes, scores, valid = proposals_jit(cls, reg, anchors, image, cfg, train=False)
    assert boxes.shape == (2, max_per_img, 5 if rotated else 4)
    want_boxes = np.array([LEVEL0[1], LEVEL1[0], LEVEL1[1]])
    want_scores = sig(np.array([3, 2.8, 0.5]))
    kept = min(max_per_img, 3)
    for b in range(2):
      np.testing.assert_array_equal(valid[b], np.arange(max_per_img) < kept)
      hboxes = np.asarray(rbox_to_hbox(boxes[b]) if rotated else boxes[b])
      want = want_boxes.copy()
      if b == 1 and not rotated:
        want[:, 3] = np.minimum(want[:, 3], 28)
      np.testing.assert_allclose(hboxes[:kept], want[:kept], atol=1e-4)
      np.testing.assert_allclose(scores[b, :kept], want_scores[:kept], rtol=1e-6)
      assert not np.asarray(boxes[b, kept:]).any() and not np.asarray(scores[b, kept:]).any()
  if not rotated:   # train=True: the level's best anchor, no size filter, one output
    boxes, scores, valid = proposals_jit(cls, reg, anchors, image, cfg, train=True)
    np.testing.assert_allclose(scores[:, 0], sig(4.0), rtol=1e-6)
    assert boxes.shape[1] == 1 and valid.all()


def test_rpn_proposals_take_all_when_level_is_small_and_stop_gradient():
  cfg = dataclasses.replace(RPNConfig.mask_rcnn(),
                            test_proposals=ProposalConfig(2000, 20, 0.995, 0.0))
  cls, reg, anchors = proposal_case(cfg)
  score_sum = lambda c: (lambda out: (out[1].sum(), out))(
      rpn_lib.rpn_proposals(c, reg, anchors, None, cfg, False))
  grad, (boxes, scores, valid) = jax.jit(jax.grad(score_sum, has_aux=True))(cls)
  # All 8 anchors are candidates (2000 > level sizes), only the zero-width one is dropped.
  assert int(valid[0].sum()) == 7
  assert not np.asarray(grad).any()                    # proposals are stop_gradient-ed


# ----------------------------------------------------------------------------------------------
# End to end: gradients and compile count

def test_gradients_finite_and_one_compile_for_any_gt_count():
  cfg = RPNConfig()
  image = (64, 64)
  rngs = nnx.Rngs(0)
  neck = fpn_lib.FPN((8, 8, 8, 8), 8, 5, rngs=rngs)
  head = rpn_lib.RPNHead(8, cfg.num_anchors, cfg.reg_dim, rngs=rngs)
  sizes = cfg.anchors.feature_sizes(image)
  anchors = jnp.concatenate(cfg.anchors.grid_anchors(sizes))
  anchor_valid = jnp.concatenate(cfg.anchors.valid_flags(sizes, image))
  feats = [jax.random.normal(jax.random.key(i), (2, 64 // s, 64 // s, 8))
           for i, s in enumerate((4, 8, 16, 32))]
  graphdef, params = nnx.split((neck, head))
  traces = []

  @jax.jit
  def step(params, gt, gt_valid, key):
    traces.append(1)

    def loss_fn(params):
      neck, head = nnx.merge(graphdef, params)
      cls, reg = head(neck(feats))
      targets = rpn_lib.batch_rpn_targets(anchors, anchor_valid, gt, gt_valid, key, cfg, image)
      losses = rpn_lib.rpn_loss(cls, reg, targets, cfg=cfg)
      return losses["rpn_cls"] + losses["rpn_bbox"], (losses, targets)

    return jax.grad(loss_fn, has_aux=True)(params)

  gt = jnp.array([[[20, 20, 30, 14, 0.3], [40, 44, 28, 20, -1.2], [5, 5, 3, 2, 0.1],
                   [62, 32, 40, 12, 1.5]]] * 2, jnp.float32)   # tiny and border-crossing boxes
  for pattern in ([[0, 0, 0, 0]] * 2, [[1, 1, 1, 1]] * 2, [[1, 0, 0, 0], [0, 1, 1, 0]]):
    grads, (losses, targets) = step(params, gt, jnp.array(pattern, bool), jax.random.key(7))
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert np.abs(np.asarray(grads[1]["rpn_cls"]["kernel"][...])).max() > 0
    assert np.abs(np.asarray(grads[0]["lateral_convs"][0]["conv"]["kernel"][...])).max() > 0
    assert np.isfinite(float(losses["rpn_cls"])) and float(losses["rpn_cls"]) > 0
    bbox_grad = np.abs(np.asarray(grads[1]["rpn_reg"]["kernel"][...])).max()
    assert (bbox_grad > 0) == bool(np.asarray(pattern).any())    # no gt: no regression signal
    assert (np.asarray(targets.num_pos) > 0).tolist() == np.asarray(pattern).any(1).tolist()
  assert len(traces) == 1
