"""The finetuning recipes against the original's code, rule by rule: each test transcribes the
original's rule (mmseg, mmrotate, open-cd, the original's configs) and checks ours against it."""

import math

import numpy as np
import pytest
from flax import nnx

from mtp_jax.errors import ConfigError

from mtp_jax.models.heads.unet import UNetHead


def test_unet_head_initialises_only_conv_seg_normal_and_the_decoder_as_pytorch():
  """open-cd's UNetHead: BaseDecodeHead's init_cfg Normal(std=0.01, override conv_seg) (bias 0);
  the decoder's nn.Conv2d keep PyTorch's kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)); the
  BatchNorms scale 1, bias 0. At the paper's widths (ViT-B maps, decoder 512/256/128/64)."""
  head = UNetHead((768,) * 4, {"levir_cd": 2}, rngs=nnx.Rngs(0))
  for i, block in enumerate(head.blocks):
    for conv_bn in (block.conv1, block.conv2):
      w = np.asarray(conv_bn.conv.kernel[...])
      bound = 1 / math.sqrt(w.shape[0] * w.shape[1] * w.shape[2])
      assert np.abs(w).max() <= bound and conv_bn.conv.bias is None, i
      assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.03, (i, w.std(), bound)
      assert abs(w.mean()) < 0.03 * bound, i
      np.testing.assert_array_equal(np.asarray(conv_bn.bn.scale[...]), 1)
      np.testing.assert_array_equal(np.asarray(conv_bn.bn.bias[...]), 0)
  seg = head.conv_seg["levir_cd"]
  w = np.asarray(seg.kernel[...])
  assert w.shape == (1, 1, 64, 2) and 0.007 < w.std() < 0.013 and np.abs(w).max() < 0.05
  np.testing.assert_array_equal(np.asarray(seg.bias[...]), 0)


def mmseg_random_resize(height: int, width: int, scale: tuple, ratio: float) -> tuple:
  """mmseg's RandomResize(scale, ratio_range, keep_ratio=True) after drawing `ratio`, transcribed:
  _random_sample_ratio's target (int(scale[0] r), int(scale[1] r)), then mmcv.imrescale's
  rescale_size: factor min(long edge / long side, short edge / short side), sizes int(x + 0.5).
  Returns (factor, new_height, new_width)."""
  target = (int(scale[0] * ratio), int(scale[1] * ratio))
  factor = min(max(target) / max(height, width), min(target) / min(height, width))
  return factor, int(height * factor + 0.5), int(width * factor + 0.5)


def test_segmentation_resize_fits_the_image_inside_the_scaled_crop_as_mmseg():
  """The original's configs: RandomResize(scale=crop, ratio_range=(0.5, 2.0), keep_ratio=True).
  A 1024-px LoveDA tile with crop 512 trains at 0.25, 0.5 and 1x for r = 0.5, 1 and 2; a 439 x 407
  SpaceNetv1 image with crop 384 likewise; and the training example is cut from that resize."""
  from data_pipelines.downstream import segmentation
  for r, want in ((0.5, 0.25), (1.0, 0.5), (2.0, 1.0)):
    assert segmentation.rescale_factor(1024, 1024, 512, r) == want == mmseg_random_resize(1024, 1024, (512, 512), r)[0]
  for r in (0.5, 0.77, 1.3, 2.0):
    assert segmentation.rescale_factor(407, 439, 384, r) == mmseg_random_resize(407, 439, (384, 384), r)[0]
  image = np.random.default_rng(1).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
  label = (np.arange(1024)[:, None] // 128 + np.arange(1024)[None] // 256).astype(np.uint8) % 7
  for seed in range(4):
    r = np.random.default_rng(seed).uniform(0.5, 2.0)   # the example's first draw
    _, new_h, new_w = mmseg_random_resize(1024, 1024, (512, 512), r)
    sample, hw = segmentation.train_example(image, label, np.random.default_rng(seed), 512)
    assert tuple(hw) == (min(new_h, 512), min(new_w, 512)) and sample["image"].shape == (512, 512, 3), (r, hw)
    assert new_h <= 1024   # never above native resolution (the old rule drew up to 2x)


def test_detection_finetune_encoders_have_no_global_rel_pos_tables():
  """xView, DIOR, DIOR-R, FAIR1M and DOTA: the original's detection backbones delete the global
  blocks' full_attn_rel_pos_{h,w}; the other finetunes (and pretraining) keep them."""
  from conftest import ROOT
  from mtp_jax import config as config_lib, models
  from mtp_jax.checkpoints import torch_convert as tc

  def keys(config_path):
    c = config_lib.load_config(f"{ROOT}/configs/{config_path}")
    encoder = nnx.eval_shape(lambda: models.build_encoder(c.model.encoder, c.data.image_size, rngs=nnx.Rngs(0),
                                                          **dict(c.model.encoder_overrides)))
    return tc.state_dict_shapes(nnx.to_pure_dict(nnx.state(encoder, nnx.Param)))

  shapes = keys("finetune/dota_v1.py")   # ViT-B+RVSA at 1024 px
  assert "blocks.11.attn.qkv.weight" in shapes and not [k for k in shapes if "full_attn_rel_pos" in k]
  assert len([k for k in keys("finetune/loveda.py") if "full_attn_rel_pos" in k]) == 8   # blocks 2, 5, 8, 11
  for name in ("xview", "dior", "dior_r", "fair1m", "dota_v2"):   # the same overrides, on the smoke's model
    shapes = keys(f"finetune/{name}.py:smoke")
    assert "blocks.2.attn.qkv.weight" in shapes and not [k for k in shapes if "full_attn_rel_pos" in k], name
  for name in ("finetune/eurosat.py:smoke", "finetune/levir_cd.py:smoke"):
    assert len([k for k in keys(name) if "full_attn_rel_pos" in k]) == 2, name


def test_dior_r_map_counts_difficult_objects_as_the_original():
  """mmrotate 1.x's DIORDataset sets no ignore flag (bbox_min_size None), so a missed object
  flagged difficult in the XML is a miss: class 0 has 2 objects, 1 found, AP = 6/11 (VOC07), and
  mAP (6/11 + 1) / 2. The DOTA rule (ignore_difficult=True, every other rd config) gives 1."""
  import jax.numpy as jnp
  from conftest import ROOT
  from mtp_jax import config as config_lib
  from mtp_jax.metrics import DotaEvaluator
  from mtp_jax import experiment

  raw = {"is_real": np.array([True, True]), "image_id": np.array(["a", "b"]),
         "rboxes": np.array([[[100, 100, 40, 20, 0.3], [300, 300, 30, 30, 0.0]],
                             [[200, 150, 50, 25, -0.5], [0, 0, 0, 0, 0]]], np.float32),
         "labels": np.array([[0, 0], [1, 0]]), "rbox_valid": np.array([[1, 1], [1, 0]], bool),
         "difficult": np.array([[0, 1], [0, 0]], np.int32)}
  dets = {"rboxes": jnp.asarray(raw["rboxes"]), "scores": jnp.asarray([[0.9, 0.0], [0.8, 0.0]]),
          "labels": jnp.asarray([[0, 0], [1, 0]]), "valid": jnp.asarray([[True, False], [True, False]])}

  def dataset_map(ignore_difficult):
    c = config_lib.load_config(f"{ROOT}/configs/finetune/dior_r.py:smoke")
    if ignore_difficult is not None:
      c.tasks.rd.ignore_difficult = ignore_difficult
    tasks = experiment.tasks(c, {"dior_r": ["airplane", "airport"]})
    evaluation = tasks["rd"].evaluator()
    evaluation.add({}, {"dior_r": dets}, {"dior_r": raw})
    return evaluation.results()["dior_r"]["map"]

  original = DotaEvaluator(2, ["airplane", "airport"])   # the original's rule: no object ignored
  for i, image in enumerate("ab"):
    keep = raw["rbox_valid"][i]
    per_class = [np.concatenate([raw["rboxes"][i][:1][raw["labels"][i][:1] == c],
                                 np.asarray(dets["scores"])[i][:1][raw["labels"][i][:1] == c][:, None]], 1)
                 for c in range(2)]
    original.add(image, per_class, {"rboxes": raw["rboxes"][i][keep].astype(np.float64), "labels": raw["labels"][i][keep]})
  original.gather()
  want = original.result()["map"]
  assert abs(want - (6 / 11 + 1) / 2) < 1e-9
  assert abs(dataset_map(None) - want) < 1e-9        # the DIOR-R config as it ships
  assert abs(dataset_map(True) - 1.0) < 1e-9         # the DOTA devkit's rule


def test_oscd_f1_is_scored_on_the_native_96_px_labels():
  """The original's OSCD val pipeline resizes the pair to 224 and loads the label after it, so
  mmseg resizes the 224-px logits back to the 96-px label (bilinear, align_corners=False) before
  the argmax: transcribed with torch. Ours: the example keeps its 96-px label and the task scores
  at that size; the same F1 to the last pixel."""
  import jax.numpy as jnp
  import torch
  from conftest import ROOT
  from data_pipelines.downstream import change, schema
  from mtp_jax import config as config_lib
  from mtp_jax.metrics.segmentation import change_detection_scores
  from mtp_jax import experiment

  c = config_lib.load_config(f"{ROOT}/configs/finetune/oscd.py")
  assert (c.data.resize, c.data.image_size, c.eval.label_size) == (224, 224, 96)
  rng = np.random.default_rng(0)
  labels = (rng.uniform(size=(2, 96, 96)) < 0.3).astype(np.uint8)
  labels[1, :10] = 255   # a border tile's ignored padding
  logits = rng.normal(size=(2, 224, 224, 2)).astype(np.float32)
  task = experiment.tasks(c, {"oscd": ["changed"]})["cd"]
  task._logits = lambda head, features, train, key=None: {"oscd": jnp.asarray(logits)}
  gt = {"oscd": {"semantic": jnp.asarray(labels), "is_real": jnp.asarray([True, True])}}
  sums, maps = task.eval_outputs(None, None, gt, (224, 224))
  ours = change_detection_scores(np.asarray(sums["oscd"].compute()))

  with torch.no_grad():
    back = torch.nn.functional.interpolate(torch.from_numpy(logits).permute(0, 3, 1, 2), size=(96, 96),
                                           mode="bilinear", align_corners=False).argmax(1).numpy()
  keep = labels != 255
  conf = np.zeros((2, 2), np.int64)
  np.add.at(conf, (labels[keep].astype(int), back[keep]), 1)
  assert np.asarray(maps["oscd"]).shape == (2, 96, 96) and (np.asarray(maps["oscd"]) == back).mean() > 0.999
  assert np.array_equal(np.asarray(sums["oscd"].compute()), conf), (np.asarray(sums["oscd"].compute()), conf)
  assert ours["f1"] == change_detection_scores(conf)["f1"]

  # The example: the pair resized to 224, the label as converted (96 px); another size is refused.
  pair = rng.integers(0, 3000, (2, 96, 96, 13), dtype=np.uint16)
  def record(label):
    return schema.encode(schema.DownstreamRecord(
        image_bytes=pair[0].tobytes(), image2_bytes=pair[1].tobytes(), height=96, width=96, channels=13,
        filename="city_0_0.tif", dataset="oscd", image_format="raw", dtype="uint16",
        semantic_bytes=schema.encode_png(label)))
  parse = dict(image_size=224, bands=(3, 2, 1), dtype="uint16", resize_to=224, label_size=96)
  example = change.to_example(record(labels[0]), **parse)
  assert example["image"].shape == (2, 224, 224, 3) and np.array_equal(example["semantic"], labels[0])
  shapes = change.example_shapes(224, 3, "uint16", 96)
  assert shapes["semantic"][0] == example["semantic"].shape and shapes["image"][0] == example["image"].shape
  with pytest.raises(ValueError, match="eval.label_size is 64"):
    change.to_example(record(labels[0]), **{**parse, "label_size": 64})
  with pytest.raises(ConfigError, match="eval.label_size"):
    config_lib.apply_overrides(config_lib.load_config(f"{ROOT}/configs/finetune/levir_cd.py"), ["eval.label_size=96"])
