"""Rotated object detection on DIOR-R, MTP's finetuning recipe (MTP_SPEC §5.2).

    python -m data_pipelines.convert dior_r --root RAW/DIOR --out data/finetune
    python main.py --config configs/finetune/dior_r.py --workdir workdirs/dior_r \
        --set model.encoder_init=workdirs/mtp_vit_b_rvsa   # or an import_torch folder / .pth
    python main.py --config configs/finetune/dior_r.py:smoke --workdir /tmp/dior_r_smoke \
        --set data.dir=data/finetune

Oriented R-CNN (MTP_SPEC §3.3: FPN 256, oriented RPN, rotated RoIAlign, Shared2FC 1024) on
ViT-B + RVSA at 800 px, 20 classes. Trains on train + val (11,725 images, MTP's trainval) with
random flips (p 0.75, horizontal / vertical / diagonal); batch 4 (1 per GPU x 4); 12 epochs of
2,931 steps, lr x 0.1 after epochs 8 and 11, 500 steps of linear warmup; AdamW lr 1e-4, weight
decay 0.05, layer decay 0.9, drop path 0.3. Metric: DOTA mAP (VOC07, IoU 0.5) on the 11,738 test
images, objects flagged difficult counted like the others (the original's DIOR dataset in
mmrotate 1.x ignores none; `--set tasks.rd.ignore_difficult=True` ignores them as DOTA's devkit). The paper (MTP ViT-B+RVSA): 71.29 (ViT-L 74.54; MAE ViT-B 68.06), §5.3.
Args: 'smoke', 'frozen', 'internimage' (configs/recipes.py finetune_options).
"""

from mtp_jax.config import sibling_module

recipes = sibling_module(__file__, "../recipes.py")   # the shared finetuning recipe


def get_config(arg=None):
  options = recipes.finetune_options(arg)
  c = recipes.detection_finetune_defaults("dior_r", image_size=800, batch=4, steps_per_epoch=2_931, epochs=12,
                                          decay_epochs=(8, 11))
  c.data.dir = "data/finetune"
  c.data.max_instances["dior_r"] = 500
  c.eval.split = "test"
  c.tasks.rd.ignore_difficult = False   # as the original's DIORDataset
  return recipes.apply_finetune_options(c, options)
