"""Fine-grained rotated object detection on FAIR1M-2.0, MTP's finetuning recipe (MTP_SPEC §5.2).

    python -m data_pipelines.convert fair1m --root RAW/FAIR1M2.0 --out data/finetune   # 800-px patches
    python main.py --config configs/finetune/fair1m.py --workdir workdirs/fair1m \
        --set model.encoder_init=workdirs/mtp_vit_b_rvsa   # or an import_torch folder / .pth
    python main.py --config configs/finetune/fair1m.py:smoke --workdir /tmp/fair1m_smoke \
        --set data.dir=data/finetune

Oriented R-CNN (MTP_SPEC §3.3) on ViT-B + RVSA at 800 px, 37 classes, on the converter's 800-px
patches (MTP's fair1m20_clip). Random flips (p 0.75, horizontal / vertical / diagonal) and
RandomRotate (p 0.5, any angle); batch 4 (1 per GPU x 4); 12 epochs of 10,466 steps (MTP's log:
125,598 iterations; set train.num_steps and optimizer.decay_steps from your conversion's patch
count / 4), lr x 0.1 after epochs 8 and 11, 500 steps of warmup; AdamW lr 1e-4, layer decay
0.9, drop path 0.3. Evaluation: the validation patches merged onto their source images (rotated
NMS 0.1), DOTA mAP (VOC07, IoU 0.5); `--set eval.split=test` writes the online benchmark's XML
submission (report/fair1m_xml/fair1m/test.zip) and DOTA Task1 files. The paper (MTP
ViT-B+RVSA, online): 51.92 (ViT-L 53.00), §5.3.
Args: 'smoke', 'frozen', 'internimage' (configs/recipes.py finetune_options).
"""

from mtp_jax.config import sibling_module

recipes = sibling_module(__file__, "../recipes.py")   # the shared finetuning recipe


def get_config(arg=None):
  options = recipes.finetune_options(arg)
  c = recipes.detection_finetune_defaults("fair1m", image_size=800, batch=4, steps_per_epoch=10_466, epochs=12,
                                          decay_epochs=(8, 11))
  c.data.dir = "data/finetune"
  c.data.rotate_prob = 0.5
  c.tasks.rd.merge_patches = True
  c.tasks.rd.submission = "fair1m"
  c.eval.split = "valid"
  return recipes.apply_finetune_options(c, options)
