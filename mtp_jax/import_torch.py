"""Import an official (or exported) PyTorch encoder checkpoint as an Orbax checkpoint.

    python -m mtp_jax.import_torch --ckpt last_vit_b_rvsa_ss_is_rd_pretrn_model_encoder.pth \
        --encoder vit_b_rvsa --img-size 512 --out checkpoints/mtp_vit_b_512 [--no-strict] [--trust-pickle]
    python -m mtp_jax.import_torch --ckpt internimage_xl_22kto1k_384.pth --encoder intern_image_xl \
        --img-size 448 --out checkpoints/imp_internimage_xl --no-strict   # ImageNet "IMP" start

Reads `.pth`/`.safetensors`, unwraps `state_dict`/`model`, strips `module.` and keeps `encoder.*`
(or `backbone.*`) of full-model checkpoints, infers the pretraining size from pos_embed, resizes
pos_embed (dropping an MAE cls token) and the global rel-pos tables bicubically to --img-size
(MTP_SPEC §5.1), then checks every key and shape (strict by default: MAE checkpoints, which lack
the RVSA parameters, need --no-strict; so does InternImage's ImageNet checkpoint, whose
classification `conv_head` / `head` the backbone lacks: MTP loads it with strict=False, §2).
Writes a standard checkpoint of step 0 holding the encoder, `<out>/checkpoints/0/{state,data,meta}`
(with the fingerprint and a signature naming the encoder and image size), and
`<out>/import_report.json`. `<out>` is then a source like a workdir: `model.encoder_init=<out>`,
`python -m mtp_jax.export --workdir <out>`, or in Python
`mtp_jax.checkpoints.manager.read_checkpoint(out)[0]["encoder"]` (nested numpy params).
"""

import ast
import json
import os

from mtp_jax import cli
from mtp_jax.errors import CheckpointError


def import_checkpoint(ckpt: str, encoder: str, img_size: int, out: str, strict: bool = True,
                      trust_pickle: bool = False, overrides: dict | None = None) -> dict:
  import jax
  import numpy as np
  from flax import nnx
  from mtp_jax.checkpoints import torch_convert as tc
  from mtp_jax.models import build_encoder

  sd = tc.read_encoder_state_dict(ckpt, trust_pickle=trust_pickle)
  source_size = tc.infer_image_size(sd)
  sd = tc.adapt_to_image_size(sd, img_size)
  overrides = dict(overrides or {})
  first = tc.input_conv_key(sd)
  if first:   # an RGB or a multispectral encoder, as the file is
    overrides.setdefault("in_chans", int(np.shape(sd[first])[1]))
  model = build_encoder(encoder, img_size, rngs=nnx.Rngs(0), **overrides)
  template = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  params, report = tc.state_dict_to_encoder(sd, template, strict=strict)
  _write_checkpoint(params, encoder, img_size, overrides, out)
  info = {"source": os.path.abspath(ckpt), "encoder": encoder, "overrides": overrides or {},
          "img_size": img_size,
          "source_img_size": source_size, **report}
  with open(os.path.join(out, "import_report.json"), "w") as f:
    json.dump(info, f, indent=1)
  return info


def _write_checkpoint(params: dict, encoder: str, img_size: int, overrides: dict, out: str):
  """`<out>/checkpoints/0`: the state {'params': {'encoder': params}}, read back by
  `manager.read_checkpoint` like a run's (fingerprint-checked)."""
  import jax
  from mtp_jax.checkpoints import manager
  if os.path.exists(os.path.join(out, "checkpoints")) or os.path.exists(os.path.join(out, "encoder")):
    raise CheckpointError(f"{out} holds an import already; choose a new --out")
  state = {"params": {"encoder": jax.device_put(params)}}
  signature = manager.signature(encoder, overrides, img_size, (), (), state["params"])
  checkpointer = manager.Checkpointer(out, keep=1, signature=signature, config_json="")
  checkpointer.save(0, state, {}, force=True)
  checkpointer.close()   # the save is asynchronous: the checkpoint exists once it is done


def main(argv=None):
  parser = cli.parser(__file__, __doc__)
  parser.add_argument("--ckpt", required=True, help="the PyTorch checkpoint: FILE.pth or FILE.safetensors")
  parser.add_argument("--encoder", required=True, help="e.g. vit_b_rvsa, vit_l_rvsa, intern_image_xl")
  parser.add_argument("--img-size", type=int, required=True, help="the image size to train at, px (pos_embed is resized to it)")
  parser.add_argument("--out", required=True, help="output folder (a new one): <out>/checkpoints/0, <out>/import_report.json")
  parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                      help="build_encoder keyword, e.g. depth=6 (repeatable; value a Python literal)")
  parser.add_argument("--no-strict", action="store_true", help="allow missing/unexpected keys")
  parser.add_argument("--trust-pickle", action="store_true",
                      help="allow torch.load of arbitrary pickled objects (only for files you trust)")
  args = parser.parse_args(argv)
  with cli.reported(CheckpointError, ValueError, TypeError, SyntaxError):
    overrides = {}
    for item in args.override:
      key, sep, text = item.partition("=")
      if not sep:
        raise ValueError(f"--override {item!r} is not KEY=VALUE")
      overrides[key] = ast.literal_eval(text)
    info = import_checkpoint(args.ckpt, args.encoder, args.img_size, args.out, strict=not args.no_strict,
                             trust_pickle=args.trust_pickle, overrides=overrides)
  print(f"imported {info['loaded']} tensors ({info['source_img_size']} px -> {args.img_size} px); "
        f"missing {len(info['missing'])}, unexpected {len(info['unexpected'])}; wrote {args.out}")


if __name__ == "__main__":
  main()
