"""Quickstart: MTP's three-task pretraining at toy size on the synthetic SAMRS sample, on a CPU.

    make quickstart
    # or, by hand, after `make data`:
    python main.py --config configs/pretrain/quickstart.py --workdir workdirs/quickstart

Same step, sharding, checkpointing and reports as the paper's configs, at toy size: 128 px,
a 4-block ViT+RVSA of width 96 (blocks 0, 1, 3 RVSA, block 2 global), 4 images per subset per
step, MTP's three tasks: UperNet with 64 channels (ss), Mask R-CNN (is) and Oriented R-CNN (rd)
with MTP's structure and assignment rules at toy widths and sample counts (FPN 64, Shared2FC 256,
mask convs 32, 128 anchors and 64 RoIs sampled per image; is: 500 proposals before NMS, 250
after; rd: 500), anchors of 4 x stride (the sample's objects have sides of 8-51 px at 128 px;
MTP's 8 x stride would leave the smallest without a positive anchor). 280 steps of 12 images and
one evaluation at the end: `make quickstart` takes about 6 minutes on 2 CPU cores, install
included (README, "What the quickstart reaches").
"""

from mtp_jax.config import pretrain_defaults


def get_config(arg=None):
  del arg
  c = pretrain_defaults()
  c.data.dir = "data/samrs_tfrecords"
  c.data.image_size = 128
  c.data.batch_per_subset = 4
  c.data.max_instances.update({"sota": 16, "sior": 16, "fast": 16})
  c.data.shuffle_window = 64
  c.model.encoder = "vit_t_rvsa"     # the paper's RVSA architecture, toy width and depth
  c.model.encoder_overrides.update(dict(embed_dim=96, depth=4, num_heads=3, out_indices=(0, 1, 2, 3)))
  c.model.drop_path_rate = 0.0
  c.tasks.ss.channels = 64
  c.tasks["is"].enabled = True
  c.tasks["is"].update(dict(neck_channels=64, fc_channels=256, mask_channels=32, anchor_scale=4.0,
                            rpn_samples=128, train_pre_nms=500, train_proposals=250,
                            test_pre_nms=500, test_proposals=250, rcnn_samples=64,
                            max_detections=100, max_candidates=2000))
  c.tasks.rd.enabled = True
  c.tasks.rd.update(dict(neck_channels=64, fc_channels=256, anchor_scale=4.0, rpn_samples=128,
                         train_proposals=500, test_proposals=500, rcnn_samples=64,
                         max_detections=200, max_candidates=2000))
  c.optimizer.lr = 2e-3               # toy model from scratch: far above the paper's 6e-5
  c.optimizer.warmup_steps = 20
  c.train.num_steps = 280            # with install, about 6 minutes on 2 cores
  c.train.log_every = 20
  c.train.checkpoint_every = 1000    # only the final one (a save costs ~20 s of steps here)
  c.eval.batch_per_subset = 4
  c.eval.report_images = 3
  c.eval.every_steps = 0              # evaluate once, at the end (an evaluation costs ~100 s here)
  return c
