"""MTP pretraining of InternImage-XL on SAMRS, the paper's settings (MTP_SPEC §2, §3).

    python -m mtp_jax.import_torch --ckpt internimage_xl_22kto1k_384.pth --encoder intern_image_xl \
        --img-size 448 --out DATA/imp_internimage_xl --no-strict      # the ImageNet "IMP" start
    python main.py --config configs/pretrain/mtp_internimage_xl.py:fsdp --workdir gs://BUCKET/mtp_internimage_xl \
        --set data.dir=DATA/samrs_tfrecords --set model.encoder_init=DATA/imp_internimage_xl
    # a TPU pod slice / a SLURM GPU cluster: launch/tpu_pod.sh, launch/slurm_gpu.sbatch (README)

Everything as configs/pretrain/mtp_vit_b_rvsa.py (448 px, 80k iterations, weight decay 0.05,
clip 5, cosine to 0 without warmup, 32 global images per subset, the three tasks with the paper's
sizes), with InternImage-XL (channels 192, depths 5-5-24-5, groups 12-24-48-96, layer scale 1e-5,
offset scale 2, post-norm; stage widths 192 ... 1536 feed the decoders): AdamW lr 2e-5, drop path
0.2, activation checkpointing (the original's with_cp), and layer decay 0.94 over its 39 blocks,
which the original really applied in pretraining (its rule matched the `encoder.` names, §3.5;
ids in mtp_jax/train/optimizer.py). `model.encoder_init` names the ImageNet-22K->1K checkpoint
(`internimage_xl_22kto1k_384.pth`, imported as above or given as the .pth itself: its
classification head is dropped, strict=False as the original). Args: 'fsdp', 'bf16', combined
with '+'.
"""

from mtp_jax.config import sibling_config


def get_config(arg=None):
  c = sibling_config(__file__, "mtp_vit_b_rvsa.py", arg)   # the paper's shared settings
  c.model.encoder = "intern_image_xl"
  c.model.drop_path_rate = 0.2
  c.optimizer.lr = 2e-5
  c.optimizer.layer_decay = 0.94
  return c
