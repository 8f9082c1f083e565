"""Urban change detection on OSCD with all 13 Sentinel-2 bands, MTP's recipe (MTP_SPEC §5.2).

    python -m data_pipelines.convert oscd --root RAW/OSCD --out data/finetune   # one conversion
    python main.py --config configs/finetune/oscd_ms.py --workdir workdirs/oscd_ms \
        --set model.encoder_init=workdirs/mtp_vit_b_rvsa     # an RGB pretraining: see rgb_bands
    python main.py --config configs/finetune/oscd_ms.py:smoke --workdir /tmp/oscd_ms_smoke \
        --set data.dir=data/finetune

The recipe of configs/finetune/oscd.py on the same tiles, with every band as the input
(sentinel2.BANDS order, the 20 m and 60 m bands on the 10 m grid), normalised per band with
Sentinel-2 L1C statistics. The patch embedding of an RGB checkpoint gets its red, green and blue
kernels on bands 3, 2, 1 (B04, B03, B02) and zeros on the others (model.rgb_bands), so the
finetune starts from the RGB model's answer. MTP finetunes RGB only (§5.3: F1 53.36 for
ViT-B+RVSA); this config is ours.
Args: 'smoke', 'frozen', 'internimage' (configs/recipes.py finetune_options).
"""

from data_pipelines.downstream import sentinel2
from mtp_jax.config import sibling_config


def get_config(arg=None):
  c = sibling_config(__file__, "oscd.py", arg)   # one recipe for RGB and all bands
  c.data.bands = ()
  c.data.mean, c.data.std = sentinel2.L1C_MEAN, sentinel2.L1C_STD
  c.model.rgb_bands = sentinel2.RGB
  return c
