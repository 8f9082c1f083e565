"""Rotated object detection on DOTA-v2.0, MTP's finetuning recipe (MTP_SPEC §5.2).

    python -m data_pipelines.convert dota_v2 --root RAW/DOTA-v2.0 --out data/finetune   # single-scale patches
    python main.py --config configs/finetune/dota_v2.py --workdir workdirs/dota_v2 \
        --set model.encoder_init=workdirs/mtp_vit_b_rvsa
    python main.py --config configs/finetune/dota_v2.py:smoke --workdir /tmp/dota_v2_smoke \
        --set data.dir=data/dota_sample   # converted with --patch-size 128 --patch-gap 32

As dota_v1.py, with 18 classes, the single-scale split (MTP's split_ss_dotav2: 1024-px patches,
gap 200), flips only (no RandomRotate), 40 epochs of 4,389 steps with lr x 0.1 after epochs 24,
32 and 38. Evaluation merges the val patches onto the source images; the test split's Task1.zip
goes to the DOTA server.
Args: 'smoke', 'frozen', 'internimage' (configs/recipes.py finetune_options).
"""

from mtp_jax.config import sibling_module

recipes = sibling_module(__file__, "../recipes.py")   # the shared finetuning recipe


def get_config(arg=None):
  options = recipes.finetune_options(arg)
  c = recipes.detection_finetune_defaults("dota_v2", image_size=1024, batch=4, steps_per_epoch=4_389, epochs=40,
                                          decay_epochs=(24, 32, 38))
  c.data.dir = "data/finetune"
  c.tasks.rd.merge_patches = True
  c.eval.split = "valid"
  return recipes.apply_finetune_options(c, options)
