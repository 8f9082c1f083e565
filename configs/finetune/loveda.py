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
Args: 'smoke', 'frozen', 'internimage' (configs/recipes.py finetune_options).
"""

from mtp_jax.config import sibling_module

recipes = sibling_module(__file__, "../recipes.py")   # the shared finetuning recipe


def get_config(arg=None):
  options = recipes.finetune_options(arg)
  c = recipes.segmentation_finetune_defaults("loveda", image_size=512, eval_image_size=1024, slide_stride=384)
  c.data.dir = "data/finetune"
  return recipes.apply_finetune_options(c, options)
