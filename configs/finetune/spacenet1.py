"""Building segmentation on SpaceNet v1 (Rio), MTP's finetuning recipe (MTP_SPEC §5.2).

    python -m data_pipelines.convert spacenet1 --root RAW/AOI_1_Rio --out data/finetune
    python main.py --config configs/finetune/spacenet1.py --workdir workdirs/spacenet1 \
        --set model.encoder_init=workdirs/mtp_vit_b_rvsa   # or an import_torch folder / .pth
    python main.py --config configs/finetune/spacenet1.py:smoke --workdir /tmp/spacenet1_smoke \
        --set data.dir=data/finetune

UperNet (512 channels, pool scales 1/2/3/6, BatchNorm, dropout 0.1) on ViT-B + RVSA; 2 classes
(background, building); random resize to fit 384 r x 384 r, r ~ U(0.5, 2.0) (the
original's RandomResize(scale=crop)), 384 x 384 crops (cat_max_ratio 0.75), flip 0.5,
photometric distortion; batch 8 (1 per GPU x 8); 80,000 steps, 1,500 of linear warmup, then
cosine to 0; AdamW lr 6e-5, weight decay 0.05, layer decay 0.9, drop path 0.3. Evaluation:
whole images (up to 439 x 407 px) on a 448-px canvas by slide inference, windows of 384 every
256 px; mIoU over both classes. Split: seeded 80 % / 20 % of the images (MTP's lists are not in
its release). The paper (MTP ViT-B+RVSA): mIoU 79.63 (ViT-L 79.54; MAE ViT-B 79.56), §5.3.
Args: 'smoke', 'frozen', 'internimage' (mtp_jax/config.py finetune_options).
"""

from mtp_jax.config import apply_finetune_options, finetune_defaults, finetune_options


def get_config(arg=None):
  options = finetune_options(arg)
  c = finetune_defaults("spacenet1", "ss")
  c.data.dir = "data/finetune"
  c.data.image_size = 384
  c.data.batch_per_subset = 8
  c.tasks.ss.channels = 512
  c.train.num_steps = 80_000
  c.optimizer.warmup_steps = 1_500
  c.train.checkpoint_every = 8_000
  c.train.log_every = 100
  c.eval.image_size = 448
  c.eval.slide_window, c.eval.slide_stride = 384, 256
  c.eval.batch_per_subset = 8
  c.eval.every_steps = 16_000
  return apply_finetune_options(c, options)
