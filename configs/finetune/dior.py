"""Horizontal object detection on DIOR, MTP's finetuning recipe (MTP_SPEC §5.2).

    python -m data_pipelines.convert dior --root RAW/DIOR --out data/finetune
    python main.py --config configs/finetune/dior.py --workdir workdirs/dior \
        --set model.encoder_init=workdirs/mtp_vit_b_rvsa   # or an import_torch folder / .pth
    python main.py --config configs/finetune/dior.py:smoke --workdir /tmp/dior_smoke \
        --set data.dir=data/finetune

Faster R-CNN (FPN 256, RPN, RoIAlign 7x7, Shared2FC 1024; MTP_SPEC §3.3 without the mask branch,
the R-CNN's low-quality matching off) on ViT-B + RVSA at 800 px, 20 classes. Trains on train +
val (11,725 images, MTP's trainval) with horizontal flips (p 0.5); batch 4 (1 per GPU x 4); 12
epochs of 2,931 steps, lr x 0.1 after epochs 8 and 11, 500 steps of linear warmup; AdamW lr 1e-4,
weight decay 0.05, layer decay 0.9, drop path 0.3. Metric: COCO box AP50 on the 11,738 test
images. The paper (MTP ViT-B+RVSA): 79.00 (ViT-L 81.70; MAE ViT-B 75.8), §5.3.
Args: 'smoke', 'frozen', 'internimage' (configs/recipes.py finetune_options).
"""

from mtp_jax.config import sibling_module

recipes = sibling_module(__file__, "../recipes.py")   # the shared finetuning recipe


def get_config(arg=None):
  options = recipes.finetune_options(arg)
  c = recipes.detection_finetune_defaults("dior", image_size=800, batch=4, steps_per_epoch=2_931, epochs=12,
                                          decay_epochs=(8, 11), task="hd")
  c.data.dir = "data/finetune"
  c.data.augment.flip_prob = 0.5
  c.data.max_instances["dior"] = 500
  c.eval.split = "test"
  return recipes.apply_finetune_options(c, options)
