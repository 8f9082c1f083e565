"""Urban change detection on OSCD (Onera, Sentinel-2), MTP's finetuning recipe (MTP_SPEC §5.2).

    python -m data_pipelines.convert oscd --root RAW/OSCD --out data/finetune
    python main.py --config configs/finetune/oscd.py --workdir workdirs/oscd \
        --set model.encoder_init=workdirs/mtp_vit_b_rvsa   # or an import_torch folder / .pth
    python main.py --config configs/finetune/oscd.py:smoke --workdir /tmp/oscd_smoke \
        --set data.dir=data/finetune
    (all 13 bands: configs/finetune/oscd_ms.py)

Siamese ViT-B + RVSA (shared weights, both dates in one pass), |f1 - f2| of the four stride-16
maps, UNet head (decoder 512/256/128/64, BatchNorm, x2 bilinear, dropout 0.1), CE over 2
classes. Input: the RGB bands (B04, B03, B02) of the 14 training cities, cut by the converter
into 96-px tiles (about 850), each resized to 224 (data.resize); uint16 digital numbers
normalised with Sentinel-2 L1C statistics (data_pipelines/downstream/sentinel2.py).
Augmentation: rotate +-20 degrees (p 0.5), flip (p 0.5), crop 224 (cat_max_ratio 0.75), date
exchange (p 0.5); batch 32 (4 per GPU x 8); 100 epochs of about 27 steps = 2,700 steps (set
optimizer.epoch_steps = ceil(the converter's training-tile count / 32), train.num_steps = 100 x
and optimizer.warmup_steps = 5 x that), 5 epochs (135 steps) of linear warmup, then cosine to 0
stepped once per epoch (the original's by_epoch=True; `--set optimizer.epoch_steps=0` moves it
every step); AdamW lr 6e-5, weight decay 0.05, layer decay 0.9, drop path
0.3. Metric: F1 of the changed class on the 10 test cities' tiles, scored at their native 96 px
(eval.label_size: the original's val pipeline loads the labels after the resize, so its logits
are resized back to 96 px before the argmax). The paper (MTP ViT-B+RVSA): F1 53.36 (ViT-L 55.92; MAE ViT-B 50.28), §5.3.
Ours: MTP's patches are 8-bit RGB made by a step its code does not show; ours keep the bands'
16-bit digital numbers, so the 8-bit photometric distortion is not applied
(data_pipelines/downstream/change.py).
Args: 'smoke', 'frozen', 'internimage' (configs/recipes.py finetune_options).
"""

from data_pipelines.downstream import sentinel2
from mtp_jax.config import sibling_module

recipes = sibling_module(__file__, "../recipes.py")   # the shared finetuning recipe


def get_config(arg=None):
  options = recipes.finetune_options(arg)
  c = recipes.finetune_defaults("oscd", "cd")
  c.data.dir = "data/finetune"
  c.data.bands = sentinel2.RGB
  c.data.mean, c.data.std = sentinel2.band_stats(sentinel2.RGB)
  c.data.resize = 224
  c.data.image_size = 224
  c.data.batch_per_subset = 32
  c.optimizer.epoch_steps = 27         # ceil(~850 / 32)
  c.train.num_steps = 100 * 27         # 100 epochs
  c.optimizer.warmup_steps = 5 * 27    # 5 epochs
  c.train.checkpoint_every = 10 * 27   # every 10 epochs
  c.train.log_every = 27
  c.eval.split = "test"
  c.eval.label_size = 96               # F1 on the converted 96-px labels, as the original
  c.eval.batch_per_subset = 32
  c.eval.every_steps = 0
  return recipes.apply_finetune_options(c, options)
