"""Land-cover segmentation on LoveDA, MTP's finetuning recipe (MTP_SPEC §5.2).

    python -m data_pipelines.convert loveda --root RAW/LoveDA --out data/finetune
    python main.py --config configs/finetune/loveda.py --workdir workdirs/loveda \
        --set model.encoder_init=workdirs/mtp_vit_b_rvsa   # or an import_torch folder / .pth
    python main.py --config configs/finetune/loveda.py:smoke --workdir /tmp/loveda_smoke \
        --set data.dir=data/finetune

UperNet (512 channels) on ViT-B + RVSA; 7 classes (background, building, road, water, barren,
forest, agricultural; no-data ignored, reduce_zero_label); random resize to fit 512 r x 512 r,
r ~ U(0.5, 2.0) (the original's RandomResize(scale=crop), so the 1024-px tiles train at 0.25-1x
their native resolution), 512 x 512 crops (cat_max_ratio 0.75), flip 0.5, photometric distortion; batch 8; 80,000 steps, 1,500 of
linear warmup, then cosine to 0; AdamW lr 6e-5, layer decay 0.9, drop path 0.3. Evaluation: the
1024 x 1024 Val images by slide inference, windows of 512 every 384 px; mIoU over the 7 classes.
MTP trains on Train + Val and reports the online Test server's mIoU: 52.39 (ViT-B+RVSA), 54.17
(ViT-L), §5.3; here Val is held out to measure.
Args: 'smoke', 'frozen', 'internimage' (mtp_jax/config.py finetune_options).
"""

from mtp_jax.config import apply_finetune_options, finetune_defaults, finetune_options


def get_config(arg=None):
  options = finetune_options(arg)
  c = finetune_defaults("loveda", "ss")
  c.data.dir = "data/finetune"
  c.data.image_size = 512
  c.data.batch_per_subset = 8
  c.tasks.ss.channels = 512
  c.train.num_steps = 80_000
  c.optimizer.warmup_steps = 1_500
  c.train.checkpoint_every = 8_000
  c.train.log_every = 100
  c.eval.image_size = 1024
  c.eval.slide_window, c.eval.slide_stride = 512, 384
  c.eval.batch_per_subset = 8
  c.eval.every_steps = 16_000
  return apply_finetune_options(c, options)
