"""Scene classification on NWPU-RESISC45 with MTP's 20 % training split (MTP_SPEC §5.2).

    python -m data_pipelines.convert resisc45 --root RAW/NWPU-RESISC45 --out data/finetune
    python main.py --config configs/finetune/resisc45.py --workdir workdirs/resisc45 \
        --set model.encoder_init=workdirs/mtp_vit_b_rvsa   # or an import_torch folder / .pth
    python main.py --config configs/finetune/resisc45.py:smoke --workdir /tmp/resisc45_smoke \
        --set data.dir=data/finetune

224 px; batch 64; 200 epochs of the 6,300 training images (20 %: 140 of each class's 700,
seeded: data_pipelines/downstream/scene_folders.py; the original's "nwpu28" list), 99 steps
each (as its logs) = 19,800 steps, the first 5 epochs (495 steps) a linear warmup, then cosine
to 0 stepped once per epoch;
otherwise as EuroSAT (configs/finetune/eurosat.py). Metric: top-1 OA on the other 80 %. The
paper (MTP ViT-B+RVSA): OA 95.57 (ViT-L 95.88), §5.3.
Args: 'smoke', 'frozen', 'internimage' (see configs/finetune/eurosat.py).
"""

from mtp_jax.config import sibling_module

recipes = sibling_module(__file__, "../recipes.py")   # the shared finetuning recipe


def get_config(arg=None):
  options = recipes.finetune_options(arg)
  c = recipes.finetune_defaults("resisc45", "cls")
  c.data.dir = "data/finetune"
  c.data.image_size = 224
  c.data.batch_per_subset = 64
  c.data.rand_augment = 2              # RandAugment, 2 ops of magnitude 9 +- 0.5
  c.optimizer.epoch_steps = 99         # ceil(6,300 / 64)
  c.train.num_steps = 200 * 99         # 200 epochs
  c.optimizer.warmup_steps = 5 * 99    # 5 epochs
  c.train.checkpoint_every = 20 * 99   # every 20 epochs
  c.train.log_every = 100
  c.eval.batch_per_subset = 64
  c.eval.every_steps = 50 * 99         # every 50 epochs
  return recipes.apply_finetune_options(c, options)
