"""Scene classification on EuroSAT's 13-band Sentinel-2 release, with MTP's recipe (MTP_SPEC §5.2).

    python -m data_pipelines.convert eurosat_ms --root RAW/EuroSATallBands --out data/finetune
    python main.py --config configs/finetune/eurosat_ms.py --workdir workdirs/eurosat_ms \
        --set model.encoder_init=workdirs/mtp_vit_b_rvsa     # an RGB pretraining: see rgb_bands
    python main.py --config configs/finetune/eurosat_ms.py:smoke --workdir /tmp/eurosat_ms_smoke \
        --set data.dir=data/finetune                          # tiny model, a minute on a CPU
    ... --set "data.bands=(3, 2, 1)" "data.mean=(947.6, 1042.9, 1118.2)" \
        "data.std=(593.8, 395.1, 333.0)" "model.rgb_bands=(0, 1, 2)"       # the RGB bands only

The recipe of configs/finetune/eurosat.py (224 px, batch 64, 100 epochs, AdamW 6e-5, layer decay
0.9, drop path 0.3) on the same scenes and the same seeded split, with all 13 bands as the input:
uint16 digital numbers normalised per band with the release's statistics (torchgeo's EuroSAT
values; the band order of the release's files: indices 1, 2, 3 are B02, B03, B04). The
patch embedding of an RGB checkpoint gets its red, green and blue kernels on bands 3, 2, 1 and
zeros on the others (model.rgb_bands), so the finetune starts from the RGB model's answer.
MTP finetunes the RGB release only (§5.3: OA 98.76 for ViT-B+RVSA); this config is ours.
Args: 'smoke', 'frozen' (mtp_jax/config.py finetune_options).
"""

import importlib.util
import os

# Per-band mean and std of EuroSAT's 13-band release (digital numbers), in the files' band order.
BAND_MEAN = (1354.40546513, 1118.24399958, 1042.92983953, 947.62620298, 1199.47283961,
             1999.79090914, 2369.22292565, 2296.82608323, 732.08340178, 12.11327804,
             1819.01027855, 1118.92391149, 2594.14080798)
BAND_STD = (245.71762908, 333.00778264, 395.09249139, 593.75055589, 566.4170017, 861.18399006,
            1086.63139075, 1117.98170791, 404.91978886, 4.77584468, 1002.58768311, 761.30323499,
            1231.58581042)


def _rgb_recipe(arg):
  """configs/finetune/eurosat.py's config for `arg`: one recipe for both releases."""
  spec = importlib.util.spec_from_file_location("_eurosat_rgb", os.path.join(os.path.dirname(__file__), "eurosat.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg=None):
  c = _rgb_recipe(arg)
  c.data.dataset = "eurosat_ms"
  c.data.subsets = ("eurosat_ms",)
  c.data.mean, c.data.std = BAND_MEAN, BAND_STD
  c.model.rgb_bands = (3, 2, 1)
  return c
