"""Every rotated-box op under jax.jit and jax.vmap: batched results equal per-item results."""

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax import ops


def _rboxes(rng, shape):
  wh = rng.uniform(4, 60, shape + (2,))
  return np.concatenate([rng.uniform(0, 120, shape + (2,)), wh.max(-1, keepdims=True),
                         wh.min(-1, keepdims=True), rng.uniform(-1.5, 1.5, shape + (1,))],
                        -1).astype(np.float32)


def _check_vmap(fn, *batched):
  got = jax.jit(jax.vmap(fn))(*batched)
  for i in range(batched[0].shape[0]):
    want = jax.jit(fn)(*(b[i] for b in batched))
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g[i], w, rtol=1e-5, atol=1e-5), got, want)


def test_ops_vmap_over_images():
  rng = np.random.default_rng(0)
  rb = _rboxes(rng, (3, 16))
  hb = np.asarray(ops.rbox_to_hbox(rb))
  feats = rng.normal(size=(3, 1, 32, 32, 4)).astype(np.float32)
  zeros = np.zeros((3, 16), np.int32)
  _check_vmap(lambda a, b: ops.box_iou_rotated(a, b), rb, rb[::-1])
  _check_vmap(lambda a: ops.nms_rotated(a, a[:, 2], 0.3, 8, tile_size=8), rb)
  _check_vmap(lambda f, b, i: ops.roi_align_rotated(f, b, i, 3, 0.25), feats, rb, zeros)
  _check_vmap(lambda f, b, i: ops.roi_align(f, b, i, 3, 0.25, sampling_ratio=2), feats, hb, zeros)
  _check_vmap(lambda p, g: ops.box_coders.ORIENTED_RCNN_CODER.encode(p, g), rb, rb[::-1])
  _check_vmap(lambda p, g: ops.box_coders.ORIENTED_RPN_CODER.encode(p, g), hb, rb)
  _check_vmap(lambda p, d: ops.box_coders.RCNN_CODER.decode(p, d), hb, hb * 1e-3)
  valid = np.ones((3, 16), bool)
  _check_vmap(lambda g, a, v: ops.max_iou_assign(ops.box_iou(g, a), v, v, 0.5, 0.4).gt_index,
              hb, hb[::-1], valid)
  keys = jax.random.split(jax.random.key(0), 3)
  _check_vmap(lambda k, g: ops.random_sample(k, g, 8, 0.5).indices, keys,
              jnp.asarray(rng.integers(-1, 3, (3, 16))))


def test_readme_example_runs():
  rng = np.random.default_rng(1)
  rboxes_a, rboxes_b = _rboxes(rng, (5,)), _rboxes(rng, (7,))
  assert ops.box_iou_rotated(rboxes_a, rboxes_b).shape == (5, 7)
  keep, count = ops.nms_rotated(rboxes_a, rboxes_a[:, 2], iou_threshold=0.1, max_outputs=5,
                                classes=np.zeros(5, int))
  assert keep.shape == (5,) and 1 <= int(count) <= 5
  gen = ops.AnchorGenerator()
  anchors = gen.grid_anchors(gen.feature_sizes((64, 64)))
  gt_hboxes = ops.rbox_to_hbox(rboxes_a)
  assigned = ops.max_iou_assign(ops.box_iou(gt_hboxes, anchors[0]), np.ones(5, bool),
                                np.ones(anchors[0].shape[0], bool), 0.7, 0.3, 0.3)
  sample = ops.random_sample(jax.random.key(0), assigned.gt_index, num=256, pos_fraction=0.5)
  assert int(sample.num_positive) >= 1 and int(sample.num_positive + sample.num_negative) == 256
