"""Building change detection on WHU-CD (the 256-px tile release), MTP's finetuning recipe (MTP_SPEC §5.2).

    python -m data_pipelines.convert whu_cd --root RAW/WHU-CD --out data/finetune
    python main.py --config configs/finetune/whu_cd.py --workdir workdirs/whu_cd \
        --set model.encoder_init=workdirs/mtp_vit_b_rvsa   # or an import_torch folder / .pth
    python main.py --config configs/finetune/whu_cd.py:smoke --workdir /tmp/whu_smoke \
        --set data.dir=data/finetune

Siamese ViT-B + RVSA (shared weights, both dates in one pass), |f1 - f2| of the four stride-16
maps, UNet head (decoder 512/256/128/64, BatchNorm, x2 bilinear, dropout 0.1), CE over 2
classes. The release's 256-px tiles, read from its own train / val / test folders (6,096 / 762 /
762 in the common split). The original's logs (`Change_Detection/logs/whu`) show 167 iterations
of 32 per epoch, about 5,334 training tiles, with 762 val and about 1,524 test: the same 7,620
tiles with about 762 moved from train to test, by a list its release does not hold. The schedule
here is the original's 167 steps per epoch; with the common split, 191 steps
(`optimizer.epoch_steps`, `train.num_steps` and `optimizer.warmup_steps` x 191) make whole passes;
augmentation: rotate +-20 degrees (p 0.5), flip (p 0.5), crop 256 (cat_max_ratio 0.75), date
exchange (p 0.5), mild photometric distortion; batch 32 (4 per GPU x 8); 200 epochs of 167
steps = 33,400 steps, 5 epochs (835 steps) of linear warmup, then cosine to 0 stepped once per
epoch (the original's by_epoch=True; `--set optimizer.epoch_steps=0` moves it every step); AdamW lr 6e-5, weight decay
0.05, layer decay 0.9, drop path 0.3. Metric: F1 of the changed class on the test tiles. The
paper (MTP ViT-B+RVSA): F1 94.32 (ViT-L 94.75; MAE ViT-B 93.77), §5.3.
Args: 'smoke', 'frozen', 'internimage' (configs/recipes.py finetune_options).
"""

from mtp_jax.config import sibling_module

recipes = sibling_module(__file__, "../recipes.py")   # the shared finetuning recipe


def get_config(arg=None):
  options = recipes.finetune_options(arg)
  c = recipes.finetune_defaults("whu_cd", "cd")
  c.data.dir = "data/finetune"
  c.data.image_size = 256
  c.data.batch_per_subset = 32
  c.optimizer.epoch_steps = 167        # the original's logs: ceil(~5,334 / 32)
  c.train.num_steps = 200 * 167        # 200 epochs
  c.optimizer.warmup_steps = 5 * 167   # 5 epochs
  c.train.checkpoint_every = 20 * 167  # every 20 epochs
  c.train.log_every = 100
  c.eval.split = "test"
  c.eval.batch_per_subset = 32
  c.eval.every_steps = 0
  return recipes.apply_finetune_options(c, options)
