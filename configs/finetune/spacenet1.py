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
Args: 'smoke', 'frozen', 'internimage' (configs/recipes.py finetune_options).
"""

from mtp_jax.config import sibling_module

recipes = sibling_module(__file__, "../recipes.py")   # the shared finetuning recipe


def get_config(arg=None):
  options = recipes.finetune_options(arg)
  c = recipes.segmentation_finetune_defaults("spacenet1", image_size=384, eval_image_size=448, slide_stride=256)
  c.data.dir = "data/finetune"
  return recipes.apply_finetune_options(c, options)
