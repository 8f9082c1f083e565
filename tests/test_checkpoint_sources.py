"""Every starting source through the one reader (`mtp_jax/checkpoints/sources.py`): an
import_torch folder is a standard checkpoint (fingerprint-checked like a run's), an import folder
of the older layout is refused with one clear message, and a checkpoint converts to the same
official keys as the file it was imported from."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from mtp_jax.checkpoints import sources
from mtp_jax.checkpoints import torch_convert as tc
from mtp_jax.checkpoints.manager import read_checkpoint
from mtp_jax.errors import CheckpointError
from mtp_jax.import_torch import import_checkpoint
from mtp_jax.models import build_encoder

TINY_ENC = dict(depth=3, embed_dim=32, num_heads=2, out_indices=(0, 1, 2, 2))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """(official encoder state dict with random values, its file, the import folder of it)."""
  root = tmp_path_factory.mktemp("sources")
  enc = build_encoder("vit_t_rvsa", 112, rngs=nnx.Rngs(0), **TINY_ENC)
  rng = np.random.default_rng(0)
  sd = {k: (v if k.endswith("relative_position_index") else rng.standard_normal(v.shape).astype(np.float32))
        for k, v in tc.encoder_to_state_dict(nnx.to_pure_dict(nnx.state(enc, nnx.Param))).items()}
  path = str(root / "encoder.safetensors")
  tc.write_state_dict(sd, path)
  out = str(root / "imported")
  info = import_checkpoint(path, "vit_t_rvsa", 112, out, overrides=TINY_ENC)
  assert info["loaded"] == len([k for k in sd if not k.endswith("relative_position_index")])
  return sd, path, out


def test_an_import_folder_is_a_standard_checkpoint_that_reads_as_its_file(imported):
  sd, path, out = imported
  params, batch_stats, meta, step = read_checkpoint(out)
  assert step == 0 and batch_stats == {} and set(params) == {"encoder"}
  assert meta["signature"]["encoder"] == "vit_t_rvsa" and meta["signature"]["image_size"] == 112
  assert len(meta["fingerprint"]) == len(list(tc.flatten_params(params)))
  from_folder, folder_step = sources.encoder_state_dict(out)
  from_file, file_step = sources.encoder_state_dict(path)
  assert (folder_step, file_step) == (0, None) and set(from_folder) == set(from_file) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(from_folder[k], v, err_msg=k)
  # The folder is a workdir to the full-model reader too: the encoder's keys, prefixed.
  model, _ = sources.model_state_dict(out)
  assert set(model) == {"encoder." + k for k in sd}
  with pytest.raises(CheckpointError, match="has no checkpoint of step 3"):
    sources.encoder_state_dict(path, 3)
  with pytest.raises(CheckpointError, match="holds an import already"):
    import_checkpoint(path, "vit_t_rvsa", 112, out, overrides=TINY_ENC)


def test_a_changed_fingerprint_and_an_old_import_folder_are_refused(imported, tmp_path):
  import shutil
  _, _, out = imported
  copy = str(tmp_path / "copy")
  shutil.copytree(out, copy)
  meta_file = os.path.join(copy, "checkpoints", "0", "meta", "metadata")
  meta = json.load(open(meta_file))
  meta["fingerprint"][0] ^= 1
  json.dump(meta, open(meta_file, "w"))
  with pytest.raises(CheckpointError, match="is damaged: its arrays differ from the fingerprint"):
    sources.encoder_state_dict(copy)

  old = tmp_path / "old_import"
  (old / "encoder").mkdir(parents=True)   # the layout import_torch wrote before: <out>/encoder
  for read in (read_checkpoint, sources.encoder_state_dict, sources.model_state_dict):
    with pytest.raises(CheckpointError, match="older `python -m mtp_jax.import_torch`.*re-run the import"):
      read(str(old))
