"""Scene classification on EuroSAT's 13-band Sentinel-2 release, with MTP's recipe (MTP_SPEC §5.2).

    python -m data_pipelines.convert eurosat_ms --root RAW/EuroSATallBands --out data/finetune
    python main.py --config configs/finetune/eurosat_ms.py --workdir workdirs/eurosat_ms \
        --set model.encoder_init=workdirs/mtp_vit_b_rvsa     # an RGB pretraining: see rgb_bands
    python main.py --config configs/finetune/eurosat_ms.py:smoke --workdir /tmp/eurosat_ms_smoke \
        --set data.dir=data/finetune                          # tiny model, a minute on a CPU
    ... --set "data.bands=(3, 2, 1)" "data.mean=(947.6, 1042.9, 1118.2)" \
        "data.std=(593.8, 395.1, 333.0)" "model.rgb_bands=(0, 1, 2)"       # the RGB bands only

The recipe of configs/finetune/eurosat.py (224 px, batch 64, 100 epochs, AdamW 6e-5, layer decay
0.9, drop path 0.3; RandAugment off: its ops are 8-bit RGB ones) on the same scenes and the same seeded split, with all 13 bands as the input:
uint16 digital numbers normalised per band with the release's statistics (torchgeo's EuroSAT
values; the band order of the release's files: indices 1, 2, 3 are B02, B03, B04). The
patch embedding of an RGB checkpoint gets its red, green and blue kernels on bands 3, 2, 1 and
zeros on the others (model.rgb_bands), so the finetune starts from the RGB model's answer.
MTP finetunes the RGB release only (§5.3: OA 98.76 for ViT-B+RVSA); this config is ours.
Args: 'smoke', 'frozen', 'internimage' (configs/recipes.py finetune_options).
"""

from data_pipelines.downstream import sentinel2
from mtp_jax.config import sibling_config


def get_config(arg=None):
  c = sibling_config(__file__, "eurosat.py", arg)   # one recipe for both releases
  c.data.dataset = "eurosat_ms"
  c.data.subsets = ("eurosat_ms",)
  c.data.mean, c.data.std = sentinel2.L1C_MEAN, sentinel2.L1C_STD
  c.model.rgb_bands = sentinel2.RGB
  c.data.rand_augment = 0   # its ops are 8-bit RGB ones (the crop, flip and erasing stay)
  return c
