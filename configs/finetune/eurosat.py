"""Scene classification on EuroSAT (RGB), MTP's finetuning recipe (MTP_SPEC §5.2).

    python -m data_pipelines.convert eurosat --root RAW/EuroSAT --out data/finetune
    python -m mtp_jax.export --workdir workdirs/mtp_vit_b_rvsa --out mtp_vit_b_rvsa.pth   # or use
    python main.py --config configs/finetune/eurosat.py --workdir workdirs/eurosat \
        --set model.encoder_init=workdirs/mtp_vit_b_rvsa     # our pretraining workdir, an
                                                            # import_torch folder or an official .pth
    python main.py --config configs/finetune/eurosat.py:smoke --workdir /tmp/eurosat_smoke \
        --set data.dir=data/finetune                          # tiny model, a minute on a CPU

224 px; batch 64 (8 per GPU x 8 in the original); 100 epochs of the 16,200 training images
(60 % of 27,000, seeded per class: data_pipelines/downstream/scene_folders.py; the count of the
original's logs, 254 iterations of 64 per epoch), 254 steps each (the last batch partial, as
mmengine's loader) = 25,400 steps, the first 5 epochs (1,270 steps) a linear warmup, then cosine
to 0 stepped once per epoch (the original's by_epoch=True; `--set optimizer.epoch_steps=0` moves
it every step); AdamW lr 6e-5, weight decay
0.05, layer decay 0.9, drop path 0.3; GAP + linear head on the last stride-16 map; CE.
Augmentation (mmpretrain's): RandomResizedCrop 224, flip 0.5, RandAugment (timm increasing, 2
ops, magnitude 9 +- 0.5), RandomErasing 0.25 (data_pipelines/downstream/classification.py). Metric:
top-1 overall accuracy on the 5,400 'valid' images (the original evaluates its val split; the
converter also writes a 'test' split of 5,400). The paper (MTP ViT-B+RVSA): OA 98.76 (ViT-L 98.78;
MAE ViT-B baseline 98.54), §5.3.
Args: 'smoke' (a 3-block ViT+RVSA of width 64 at 64 px, 30 steps, no RandAugment), 'frozen' (linear probing:
the encoder frozen), 'internimage' (InternImage-XL: lr 2e-5, drop path 0.2, no layer decay as the original; the
linear head on its last, 1536-d stride-32 map, MTP's IMP+MTP XL: OA 99.24); combine with '+',
e.g. `eurosat.py:smoke+frozen`, `eurosat.py:internimage`.
"""

from mtp_jax.config import sibling_module

recipes = sibling_module(__file__, "../recipes.py")   # the shared finetuning recipe


def get_config(arg=None):
  options = recipes.finetune_options(arg)
  c = recipes.finetune_defaults("eurosat", "cls")
  c.data.dir = "data/finetune"
  c.data.image_size = 224
  c.data.batch_per_subset = 64
  c.data.rand_augment = 2              # RandAugment, 2 ops of magnitude 9 +- 0.5
  c.optimizer.epoch_steps = 254        # ceil(16,200 / 64), as the original's logs
  c.train.num_steps = 100 * 254        # 100 epochs
  c.optimizer.warmup_steps = 5 * 254   # 5 epochs
  c.train.checkpoint_every = 10 * 254  # every 10 epochs
  c.train.log_every = 100
  c.eval.batch_per_subset = 64
  c.eval.every_steps = 20 * 254        # every 20 epochs
  return recipes.apply_finetune_options(c, options)
