"""notebooks/quickstart.ipynb executed headless in a real Jupyter kernel (nbclient + ipykernel)
against the installed package, at the suite's tiny size (the shared three-task run's model, 3
steps, 64 px): every cell runs top to bottom, and
what it produced is checked. The notebook in the repository has its outputs stripped."""

import json
import math
import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import MTP_RUN, ROOT, TEST_XLA_FLAGS, tiny_overrides

NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def test_the_repository_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(c.outputs == [] and c.execution_count is None for c in code)
  nbformat.validate(nb)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """The notebook run in a kernel whose environment sets the tiny model (MTP_NOTEBOOK_SETS) and
  finetunes on one device (the classification smokes' 8-device path is test_finetune's)."""
  work = tmp_path_factory.mktemp("notebook")
  sets = [s for s in tiny_overrides("unused", **{**MTP_RUN, "train.num_steps": 3})
          if not s.startswith(("data.dir=", "data.image_size="))]
  env = {"MTP_NOTEBOOK_WORK": str(work), "MTP_NOTEBOOK_SETS": json.dumps(sets), "MTP_NOTEBOOK_STEPS": "3",
         "MTP_NOTEBOOK_FINETUNE_SETS": json.dumps(["mesh.num_devices=1"]),   # as test_finetune's smokes
         "MTP_NOTEBOOK_SIZE": "64", "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8 " + TEST_XLA_FLAGS,
         "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
  nb = nbformat.read(NOTEBOOK, as_version=4)
  with pytest.MonkeyPatch.context() as patch:   # the kernel inherits this process's environment
    for k, v in env.items():
      patch.setenv(k, v)
    try:
      NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    finally:   # with its outputs and each cell's timing (metadata.execution), to read a failure
      nbformat.write(nb, str(work / "executed.ipynb"))
  return nb, work


def test_every_cell_runs_and_the_run_is_summarised(executed):
  nb, work = executed
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
  assert not errors
  summary = json.load(open(work / "notebook_summary.json"))
  assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
  assert set(summary["pretrain_eval"]) == {"sota", "sior", "fast"}
  for numbers in summary["pretrain_eval"].values():
    assert all(0.0 <= v <= 1.0 for v in numbers.values()), numbers
  assert set(summary["finetune_miou"]) == {"random start", "MTP-pretrained"}
  assert all(0.0 <= v <= 1.0 for v in summary["finetune_miou"].values())
  assert summary["scene_tiles"] == 9          # 128 x 128 px: 64-px windows at the stride of 32
  assert summary["torch_max_difference"] < 1e-4


def test_the_notebook_shows_its_figures_and_writes_the_prediction_and_export(executed):
  nb, work = executed
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
  assert len(images) >= 7   # the losses, three subsets' and two finetunes' predictions, the scene
  assert (work / "losses.png").stat().st_size > 0
  for name in ("scene_ss.png", "scene_preview.png", "scene.json"):
    assert (work / "predicted" / name).stat().st_size > 0, name
  assert os.path.isdir(work / "predicted" / "scene_rd_dota")
  assert (work / "encoder.pth").stat().st_size > 0
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if o.output_type == "stream")
  assert "step 3/3" in text and "max |JAX - PyTorch|" in text and "gain of the pretrained start" in text
  for start in ("finetune_random", "finetune_pretrained"):
    assert (work / start / "report" / "loveda_predictions.png").stat().st_size > 0
