"""MTP pretraining of ViT-L + RVSA on SAMRS, the paper's settings (MTP_SPEC §3).

    python main.py --config configs/pretrain/mtp_vit_l_rvsa.py:fsdp --workdir gs://BUCKET/mtp_vit_l_rvsa \
        --set data.dir=DATA/samrs_tfrecords \
        --set model.encoder_init=DATA/vit_large_norm_pix/vit-l-mae-checkpoint-1599.pth
    # a TPU pod slice / a SLURM GPU cluster: launch/tpu_pod.sh, launch/slurm_gpu.sbatch (README)

Everything as configs/pretrain/mtp_vit_b_rvsa.py (448 px, 80k iterations, lr 6e-5, wd 0.05, clip
5, drop path 0.1, 32 global images per subset, layer decay 1.0 as the paper's run effectively
had, MAE-initialised encoder), with the 24-block ViT-L (width 1024, 16 heads, global attention in
blocks 5, 11, 17, 23, features from blocks 7, 11, 15, 23). Same args: 'fsdp', 'bf16', combined with '+'.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_mtp_vit_b_rvsa", os.path.join(os.path.dirname(__file__), "mtp_vit_b_rvsa.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config(arg=None):
  c = _base.get_config(arg)
  c.model.encoder = "vit_l_rvsa"
  return c
