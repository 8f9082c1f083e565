"""Where Mask R-CNN's step time goes: its parts timed one by one (printed and written to JSON;
never a test).

    python benchmarks/mask_rcnn_parts.py [--data data/samrs_tfrecords] [--steps 5]
        [--set tasks.is.mask_channels=64 ...] [--out benchmarks/results/mask_rcnn_parts.json]

With the quickstart config's Mask R-CNN sizes (or --set overrides) on the default device: the
whole head (the task's losses, forward + backward to the parameters and the encoder maps, on one
real batch of --data and random encoder maps), then each part alone on inputs of the shapes that
step feeds it (all subsets' images together, RoIs of 8-64 px; random values): RoIAlign of the
box branch (7 x 7) and of the mask branch (14 x 14) (forward + backward to the maps), the mask
trunk (4 convs + deconv), the label's conv_logits against mmdet's all-class conv_logits then a
pick, the mask targets from crops, and the RPN proposals (forward: no gradient flows through
them). Times are means over --steps calls after a first, compiling one. --data must hold the
converted sample (`make data`).
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mtp_jax import experiment  # noqa: E402
from mtp_jax.config import apply_overrides, load_config  # noqa: E402
from mtp_jax.models.detection.roi_head import roi_features  # noqa: E402
from mtp_jax.models.detection.rpn import rpn_proposals  # noqa: E402
from mtp_jax.ops.mask_targets import mask_targets  # noqa: E402
from _report import write_result  # noqa: E402

QUICKSTART = "configs/pretrain/quickstart.py"
STRIDES = (4, 8, 16, 32)


def timed(fn, *args, steps: int) -> dict:
  """Compile time and mean call time of jit(fn)(*args)."""
  t = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t
  jax.block_until_ready(compiled(*args))
  t = time.perf_counter()
  for _ in range(steps):
    out = compiled(*args)
  jax.block_until_ready(out)
  return {"compile_s": round(compile_s, 2), "step_s": round((time.perf_counter() - t) / steps, 4)}


def grad_of_sum(fn, argnums):
  """Forward + backward of sum(fn(...)) with respect to `argnums`."""
  return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=argnums)


def module_grad(module, call):
  """Forward + backward of sum(call(module, x, *rest)) to the module's parameters and x:
  (params, x, *rest) -> grads."""
  graphdef, params = nnx.split(module)
  return params, grad_of_sum(lambda p, x, *rest: call(nnx.merge(graphdef, p), x, *rest), (0, 1))


def random_rois(key, images, count, size):
  """(images, count, 4) horizontal boxes with sides 8-64 px inside a size x size image."""
  k1, k2 = jax.random.split(key)
  wh = jax.random.uniform(k1, (images, count, 2), minval=8.0, maxval=64.0)
  xy = jax.random.uniform(k2, (images, count, 2)) * (size - wh)
  return jnp.concatenate([xy, xy + wh], -1)


def whole_head(config, task, head, feats, steps):
  """The task's losses on one real batch of config.data.dir and the given encoder maps."""
  from data_pipelines.samrs import examples as samrs_examples
  subsets = tuple(config.data.subsets)
  batches = samrs_examples.train_batches(config.data.dir, subsets, image_size=config.data.image_size,
                                         max_instances=dict(config.data.max_instances),
                                         batch_size=config.data.batch_per_subset, seed=0, with_masks=True)
  raw = next(batches)
  batches.close()
  gt = {s: {f: jnp.asarray(raw[s][f]) for f in task.fields(True)} for s in subsets}
  graphdef, params = nnx.split(head)

  def loss(params, feats):
    parts = task.losses(nnx.merge(graphdef, params), feats, gt, train=True, key=jax.random.key(0),
                        normalizers={})
    return sum(parts.values())

  return timed(jax.grad(loss, argnums=(0, 1)), params, feats, steps=steps)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--data", default="data/samrs_tfrecords")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--set", action="append", default=[], help="config overrides, key=value")
  p.add_argument("--out", default="benchmarks/results/mask_rcnn_parts.json")
  args = p.parse_args()
  config = apply_overrides(load_config(QUICKSTART), [f"data.dir={args.data!r}", "tasks.is.enabled=True",
                                                      *args.set])
  task = experiment.tasks(config)["is"]
  width = config.model.encoder_overrides.embed_dim
  head = task.build_head([width] * 4, rngs=nnx.Rngs(0))
  t = config.tasks["is"]
  size = config.data.image_size
  images = config.data.batch_per_subset * len(config.data.subsets)
  channels, mask_cfg, roi_cfg = t.neck_channels, head.mask_cfg, head.roi_cfg
  num_pos = int(roi_cfg.num_samples * roi_cfg.pos_fraction)
  keys = iter(jax.random.split(jax.random.key(1), 32))
  random_maps = lambda c: [jax.random.normal(next(keys), (images, size // s, size // s, c))
                           for s in STRIDES]
  encoder_maps, maps = random_maps(width), random_maps(channels)   # the head's input, its FPN's
  box_rois = random_rois(next(keys), images, roi_cfg.num_samples, size)
  mask_rois = box_rois[:, :num_pos]
  roi_feats = jax.random.normal(next(keys), (images * num_pos, mask_cfg.roi_size, mask_cfg.roi_size,
                                             channels))
  trunk_out = jax.random.normal(next(keys), (images * num_pos, mask_cfg.mask_size, mask_cfg.mask_size,
                                             mask_cfg.conv_channels))
  labels = jax.random.randint(next(keys), (images * num_pos,), 0, 10)
  predictor = head.mask_predictors[config.data.subsets[-1]]
  predictor_params, label_logits = module_grad(predictor, lambda m, x, l: m.class_logits(x, l))
  _, every_logits = module_grad(predictor,
                                lambda m, x, l: jnp.take_along_axis(m(x), l[:, None, None, None], -1))
  trunk_params, trunk_grad = module_grad(head.mask_head, lambda m, x: m(x))
  crops = jax.random.randint(next(keys), (images, config.data.max_instances["fast"], 56, 56), 0, 256
                             ).astype(jnp.uint8)
  crop_boxes = random_rois(next(keys), images, crops.shape[1], size)
  gt_index = jax.random.randint(next(keys), (images, num_pos), -1, crops.shape[1])
  anchors = head.rpn_cfg.anchors.grid_anchors([(size // s, size // s) for s in STRIDES + (64,)])
  num_anchors = sum(a.shape[0] for a in anchors)
  rpn_cls = jax.random.normal(next(keys), (images, num_anchors))
  rpn_reg = 0.1 * jax.random.normal(next(keys), (images, num_anchors, 4))

  parts = {
      "RoIAlign box 7x7 (fwd+bwd)": timed(grad_of_sum(
          lambda m, r: roi_features(m, r, roi_cfg), 0), maps, box_rois, steps=args.steps),
      "RoIAlign mask 14x14 (fwd+bwd)": timed(grad_of_sum(
          lambda m, r: roi_features(m, r, roi_cfg, output_size=mask_cfg.roi_size), 0),
          maps, mask_rois, steps=args.steps),
      "mask trunk, 4 convs + deconv (fwd+bwd)": timed(trunk_grad, trunk_params, roi_feats,
                                                      steps=args.steps),
      "conv_logits, the label's (fwd+bwd)": timed(label_logits, predictor_params, trunk_out, labels,
                                                  steps=args.steps),
      "conv_logits, all classes then a pick (fwd+bwd)": timed(every_logits, predictor_params,
                                                              trunk_out, labels, steps=args.steps),
      "mask targets (fwd)": timed(jax.vmap(lambda c, b, r, i: mask_targets(c, b, r, i, mask_cfg.mask_size)),
                                  crops, crop_boxes, mask_rois, gt_index, steps=args.steps),
      "RPN proposals, train (fwd)": timed(lambda c, r: rpn_proposals(c, r, anchors, (size, size),
                                                                     head.rpn_cfg, True),
                                          rpn_cls, rpn_reg, steps=args.steps),
  }
  result = {
      "device": str(jax.devices()[0].device_kind), "image_size": size, "images": images,
      "is": {k: t[k] for k in t if k not in ("enabled", "weight")},
      "whole head, losses (fwd+bwd)": whole_head(config, task, head, encoder_maps, args.steps),
      "parts": parts,
  }
  write_result(result, args.out)


if __name__ == "__main__":
  main()
