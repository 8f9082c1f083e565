"""MTP pretraining of ViT-B + RVSA on SAMRS, the paper's settings (MTP_SPEC §3).

    # one host (all its accelerators):
    python main.py --config configs/pretrain/mtp_vit_b_rvsa.py --workdir gs://BUCKET/mtp_vit_b_rvsa \
        --set data.dir=DATA/samrs_tfrecords --set model.encoder_init=DATA/vit-b-checkpoint-1599.pth
    # a TPU pod slice / a SLURM GPU cluster: launch/tpu_pod.sh, launch/slurm_gpu.sbatch (README)

448 px (the original README's pretraining command, `--image_size 448`; its finetune configs load
an encoder from a folder named `vit_b_rvsa_224_mae_samrs_mtp_three`, a name from a 224-px run;
the released checkpoints and the paper's numbers are the 448 command's); 80,000 iterations; AdamW lr 6e-5, betas (0.9, 0.999), weight decay 0.05 (none on 1-D
parameters and pos_embed), gradient clip 5, cosine to 0 without warmup; drop path 0.1; UperNet
with 256 channels. The batch: 1 image per subset per process on the original's 32 processes,
i.e. `data.batch_per_subset = 32` GLOBAL images per subset (96 per step); on fewer devices keep it
and let it split (32 must be a multiple of the batch shards), or add gradient accumulation.
Layer decay: the original asked for 0.9 but applied 1 (§3.5, §7.1); 1.0 here reproduces the
paper's numbers, `--set optimizer.layer_decay=0.9` applies it. The encoder starts from MAE
(MillionAID, `vit-b-checkpoint-1599.pth`) when `model.encoder_init` names it; RVSA parameters,
which MAE lacks, keep their initialisation (§3.5).
Tasks: the paper's three, trained together in one step (§3.2, §3.3): semantic segmentation
(UperNet), instance segmentation (Mask R-CNN) and rotated detection (Oriented R-CNN), each with
the paper's sizes (the task defaults).
Arg: 'fsdp' shards parameters and optimizer state over all devices (mesh (1, -1, 1)) instead of
pure data parallelism; 'bf16' computes in bfloat16; combine with '+', e.g. `...py:fsdp+bf16`.
"""

from mtp_jax.config import pretrain_defaults


def get_config(arg=None):
  options = set(filter(None, (arg or "").split("+")))
  unknown = options - {"fsdp", "bf16"}
  if unknown:
    raise ValueError(f"unknown option(s) {sorted(unknown)}; known: fsdp, bf16")
  c = pretrain_defaults()
  c.data.image_size = 448
  c.data.batch_per_subset = 32
  c.model.encoder = "vit_b_rvsa"
  c.model.drop_path_rate = 0.1
  c.tasks.ss.channels = 256
  c.model.remat = True                 # the original trained with activation checkpointing (§6)
  c.optimizer.lr = 6e-5
  c.optimizer.weight_decay = 0.05
  c.optimizer.grad_clip_norm = 5.0
  c.optimizer.warmup_steps = 0
  c.optimizer.layer_decay = 1.0
  c.train.num_steps = 80_000
  c.train.checkpoint_every = 5000      # the original's --interval (§3.6)
  c.train.keep_checkpoints = 3
  c.train.keep_every = 20_000
  c.eval.every_steps = 10_000          # the original only validated at the end (§3.6); curves help
  c.tasks.ss.enabled = True
  c.tasks["is"].enabled = True         # Mask R-CNN with the paper's sizes (task defaults)
  c.tasks.rd.enabled = True            # Oriented R-CNN with the paper's sizes (task defaults)
  if "fsdp" in options:
    c.mesh.shape = (1, -1, 1)
  if "bf16" in options:
    c.model.compute_dtype = "bfloat16"
  return c
