"""Building change detection on LEVIR-CD, MTP's finetuning recipe (MTP_SPEC §5.2).

    python -m data_pipelines.convert levir_cd --root RAW/LEVIR-CD --out data/finetune
    python main.py --config configs/finetune/levir_cd.py --workdir workdirs/levir_cd \
        --set model.encoder_init=workdirs/mtp_vit_b_rvsa   # or an import_torch folder / .pth
    python main.py --config configs/finetune/levir_cd.py:smoke --workdir /tmp/levir_smoke \
        --set data.dir=data/finetune

Siamese ViT-B + RVSA (shared weights, both dates in one pass), |f1 - f2| of the four stride-16
maps, UNet head (decoder 512/256/128/64, BatchNorm, x2 bilinear, dropout 0.1), CE over 2
classes. The 1024-px pairs are cut into 256-px tiles by the converter (7,120 training tiles);
augmentation: rotate +-20 degrees (p 0.5), flip (p 0.5), crop 256 (cat_max_ratio 0.75), date
exchange (p 0.5), mild photometric distortion; batch 32 (4 per GPU x 8); 150 epochs of 223
steps (as the original's logs) = 33,450 steps, 5 epochs (1,115 steps) of linear warmup, then
cosine to 0 stepped once per epoch (the original's by_epoch=True; `--set
optimizer.epoch_steps=0` moves it every step); AdamW lr 6e-5, weight decay
0.05, layer decay 0.9, drop path 0.3. Metric: F1 of the changed class on the test tiles. The
paper (MTP ViT-B+RVSA): F1 92.22 (ViT-L 92.67; MAE ViT-B 92.21), §5.3.
Args: 'smoke', 'frozen', 'internimage' (configs/recipes.py finetune_options).
"""

from mtp_jax.config import sibling_module

recipes = sibling_module(__file__, "../recipes.py")   # the shared finetuning recipe


def get_config(arg=None):
  options = recipes.finetune_options(arg)
  c = recipes.finetune_defaults("levir_cd", "cd")
  c.data.dir = "data/finetune"
  c.data.image_size = 256
  c.data.batch_per_subset = 32
  c.optimizer.epoch_steps = 223        # ceil(7,120 / 32)
  c.train.num_steps = 150 * 223        # 150 epochs
  c.optimizer.warmup_steps = 5 * 223   # 5 epochs
  c.train.checkpoint_every = 10 * 223  # every 10 epochs
  c.train.log_every = 100
  c.eval.split = "test"
  c.eval.batch_per_subset = 32
  c.eval.every_steps = 0
  return recipes.apply_finetune_options(c, options)
