"""Horizontal object detection on xView, MTP's finetuning recipe (MTP_SPEC §5.2).

    python -m data_pipelines.convert xview --root RAW/xView --out data/finetune   # MTP's 416-px patches
    python main.py --config configs/finetune/xview.py --workdir workdirs/xview \
        --set model.encoder_init=workdirs/mtp_vit_b_rvsa   # or an import_torch folder / .pth
    python main.py --config configs/finetune/xview.py:smoke --workdir /tmp/xview_smoke \
        --set data.dir=data/finetune

RetinaNet (FPN from stride 8 with two extra convs on the input, 4-conv heads, octave anchors
4 x 2^(i/3), ratios 0.5 / 1 / 2, strides 8-128; focal loss gamma 2, alpha 0.25 + L1;
mtp_jax/models/heads/retinanet.py) on ViT-B + RVSA at 416 px, 60 classes, on the converter's
patches of the 700 training images (prepare_xview_dataset.py). Horizontal flips (p 0.5); batch
4 (1 per GPU x 4); 12 epochs, lr x 0.1 after epochs 8 and 11, 500 steps of warmup; AdamW lr
1e-4, layer decay 0.9, drop path 0.3. The epoch is 2,511 steps, the original's own count (its
log `Horizontal_Detection/logs/xview/rvsa-b-mae-mtp.json` starts epoch 2 after iteration 2,511:
about 10,040 training patches / 4); a conversion with another patch count sets
train.num_steps = 12 x and optimizer.decay_steps = (8 x, 11 x) its count / 4. Metric: COCO box AP50 on
the patches of the other 146 images. The paper (MTP ViT-B+RVSA): 16.40 (ViT-L 19.40; MAE ViT-B
14.6), §5.3.
Args: 'smoke', 'frozen', 'internimage' (configs/recipes.py finetune_options).
"""

from mtp_jax.config import sibling_module

recipes = sibling_module(__file__, "../recipes.py")   # the shared finetuning recipe


def get_config(arg=None):
  options = recipes.finetune_options(arg)
  c = recipes.detection_finetune_defaults("xview", image_size=416, batch=4, steps_per_epoch=2_511, epochs=12,
                                          decay_epochs=(8, 11), task="hd")
  c.data.dir = "data/finetune"
  c.data.augment.flip_prob = 0.5
  c.data.max_instances["xview"] = 500
  c.tasks.hd.detector = "retinanet"
  c.eval.split = "valid"
  return recipes.apply_finetune_options(c, options)
