"""Rotated object detection on DOTA-v1.0, MTP's finetuning recipe (MTP_SPEC §5.2).

    python -m data_pipelines.convert dota_v1 --root RAW/DOTA --out data/finetune   # multi-scale patches
    python main.py --config configs/finetune/dota_v1.py --workdir workdirs/dota_v1 \
        --set model.encoder_init=workdirs/mtp_vit_b_rvsa   # or an import_torch folder / .pth
    python -m data_pipelines.convert dota_v1 --root SAMPLE/DOTA --out data/dota_sample \
        --patch-size 128 --patch-gap 32                          # the synthetic sample's small patches
    python main.py --config configs/finetune/dota_v1.py:smoke --workdir /tmp/dota_v1_smoke \
        --set data.dir=data/dota_sample

Oriented R-CNN (MTP_SPEC §3.3) on ViT-B + RVSA at 1024 px, 15 classes, on the converter's
1024-px patches of the multi-scale split (MTP's split_ms_dotav1: rates 0.5 / 1.0 / 1.5, gap 500;
data_pipelines/downstream/dota_split.py). Random flips (p 0.75, horizontal / vertical / diagonal)
and RandomRotate (p 0.5, any angle; multiples of 90 degrees for images holding storage tanks or
roundabouts); batch 4 (2 per GPU x 2 A40s); 12 epochs of 17,082 steps (MTP's train + val patches:
set train.num_steps and optimizer.decay_steps from your conversion's patch count / 4), lr x 0.1
after epochs 8 and 11, 500 steps of warmup; AdamW lr 1e-4, layer decay 0.9, drop path 0.3.
Evaluation: the val patches, their detections merged onto the source images (rotated NMS 0.1)
and scored there, DOTA mAP (VOC07, IoU 0.5, difficult objects ignored); the Task1 submission
(report/dota_task1/dota_v1/Task1.zip) of `--set eval.split=test` goes to the DOTA server. MTP
trains on train + val and scores test online; its DOTA numbers are in the paper's tables, not in
its README or logs.
Args: 'smoke', 'frozen', 'internimage' (configs/recipes.py finetune_options).
"""

from mtp_jax.config import sibling_module

recipes = sibling_module(__file__, "../recipes.py")   # the shared finetuning recipe


def get_config(arg=None):
  options = recipes.finetune_options(arg)
  c = recipes.detection_finetune_defaults("dota_v1", image_size=1024, batch=4, steps_per_epoch=17_082, epochs=12,
                                          decay_epochs=(8, 11))
  c.data.dir = "data/finetune"
  c.data.rotate_prob = 0.5
  c.tasks.rd.merge_patches = True
  c.eval.split = "valid"
  return recipes.apply_finetune_options(c, options)
