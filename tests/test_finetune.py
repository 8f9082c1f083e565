"""Finetuning (MTP_SPEC §5): the scene releases' native readers and converter, the `:smoke`
configs training and evaluating, the encoder carried over from a pretraining workdir (exactly,
and resized bicubically to a new image size), and the frozen-encoder mode."""

import json
import os

import numpy as np
import pytest
import torch

from data_pipelines import convert as convert_cli
from data_pipelines.downstream import scene_folders, schema, synthetic
from mtp_jax import config as config_lib
from mtp_jax.checkpoints.manager import read_checkpoint
from mtp_jax.checkpoints import torch_convert
from mtp_jax.errors import CheckpointError, DataError

from conftest import ROOT, SAMPLE_SIZE

# The encoder of the shared pretraining run (conftest.tiny_overrides): a finetune built with it
# can start from that run's workdir.
TINY_ENCODER = ["model.encoder_overrides.embed_dim=48", "model.encoder_overrides.depth=2",
                "model.encoder_overrides.num_heads=2", "model.encoder_overrides.out_indices=(0, 1, 1, 1)",
                "model.encoder_overrides.patch_size=8"]


def flat(tree) -> dict:
  """{parameter path as a tuple of str: numpy array} of a nested parameter tree."""
  return {tuple(map(str, k)): np.asarray(v) for k, v in torch_convert.flatten_params(tree)}


def read_records(path):
  import grain
  return [schema.decode(r) for r in grain.experimental.TFRecordIterDataset(path)]


@pytest.fixture(scope="module")
def scene_data(tmp_path_factory):
  """Tiny EuroSAT and RESISC-45 releases in their native layouts (with a foreign folder and an
  unreadable image in EuroSAT), converted; returns (raw root, converted dir)."""
  raw = str(tmp_path_factory.mktemp("scene_raw"))
  out = str(tmp_path_factory.mktemp("scene_tfrecords"))
  synthetic.write_scene_release("eurosat", raw, per_class=10, seed=1)
  synthetic.write_scene_release("resisc45", raw, per_class=5, seed=2)
  os.makedirs(os.path.join(raw, "2750", "Glacier"))
  with open(os.path.join(raw, "2750", "Glacier", "Glacier_1.jpg"), "wb") as f:
    f.write(b"\xff\xd8 not an image of a listed class")
  with open(os.path.join(raw, "2750", "River", "River_11.jpg"), "wb") as f:
    f.write(b"truncated")
  log = []
  for name in ("eurosat", "resisc45"):
    convert_cli.convert_release(convert_cli.RELEASES[name], raw, out, seed=0, log=log.append)
  return raw, out, log


def test_scene_converters_read_the_native_layouts(scene_data):
  raw, out, log = scene_data
  info = json.load(open(os.path.join(out, "eurosat", "train", "dataset_info.json")))
  valid = json.load(open(os.path.join(out, "eurosat", "valid", "dataset_info.json")))
  assert info["class_names"] == list(scene_folders.EUROSAT_CLASSES)
  test = json.load(open(os.path.join(out, "eurosat", "test", "dataset_info.json")))
  # 10 per class, 60 % train, 20 % valid, 20 % test (the original's 16,200 / 5,400 / 5,400 of
  # 27,000); River has an 11th file (7 / 2 / 2 of 11), unreadable, drawn into valid: named and skipped.
  assert (info["num_examples"], valid["num_examples"], test["num_examples"]) == (61, 19, 20)
  assert info["examples_per_class"] == {c: 7 if c == "River" else 6 for c in scene_folders.EUROSAT_CLASSES}
  assert set(test["examples_per_class"].values()) == {2}
  splits = [set(d["signature"]["samples"]) for d in (info, valid, test)]
  assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
  skipped = info["skipped"] + valid["skipped"] + test["skipped"]
  assert [s["sample"] for s in skipped] == ["River/River_11.jpg"] and "unreadable" in skipped[0]["reason"]
  assert any("Glacier" in line and "not one of the 10 eurosat classes" in line for line in log)
  records = read_records(os.path.join(out, "eurosat", "train", info["shards"][0]["file"]))
  assert len(records) == 61 and records[0].dataset == "eurosat"
  for r in records:
    cls = r.filename.split("/")[0]
    assert r.label == scene_folders.EUROSAT_CLASSES.index(cls) and (r.height, r.width, r.channels) == (64, 64, 3)
    with open(os.path.join(raw, "2750", r.filename), "rb") as f:
      assert f.read() == r.image_bytes   # the source bytes, untouched
  # RESISC-45: MTP's 20 % training split, 1 of each class's 5 here; seeded and reproducible.
  r_train = json.load(open(os.path.join(out, "resisc45", "train", "dataset_info.json")))
  r_valid = json.load(open(os.path.join(out, "resisc45", "valid", "dataset_info.json")))
  assert r_train["num_examples"] == 45 and r_valid["num_examples"] == 180
  samples, _ = scene_folders.RESISC45.list_samples(raw)
  again = scene_folders.split_samples(samples, 45, 0.2, seed=0)
  assert [p for p, _ in again["train"]] == r_train["signature"]["samples"]
  assert scene_folders.split_samples(samples, 45, 0.2, seed=1)["train"] != again["train"]


def test_scene_converter_is_idempotent_strict_and_refuses_other_folders(scene_data, tmp_path):
  raw, out, _ = scene_data
  log = []
  convert_cli.convert_release(scene_folders.EUROSAT, raw, out, seed=0, log=log.append)
  assert all("nothing to do" in line for line in log if "skipping" not in line) and log
  with pytest.raises(DataError, match="holds another conversion"):
    convert_cli.convert_release(scene_folders.EUROSAT, raw, out, seed=5, log=lambda *_: None)
  with pytest.raises(DataError, match="Glacier.*not one of the 10 eurosat classes"):
    convert_cli.convert_release(scene_folders.EUROSAT, raw, str(tmp_path / "strict"), strict=True,
                               log=lambda *_: None)
  with pytest.raises(DataError, match="holds no eurosat release"):
    convert_cli.convert_release(scene_folders.EUROSAT, str(tmp_path), str(tmp_path / "x"), log=lambda *_: None)
  with pytest.raises(SystemExit) as exit_info:
    convert_cli.main(["eurosat", "--root", str(tmp_path), "--out", str(tmp_path / "y")])
  assert exit_info.value.code == 2


def smoke_config(dataset, data_dir, *sets, arg="smoke", all_devices=False):
  """The config's `:arg` on `data_dir`, on one device (a third faster to compile and run here)
  unless all_devices: one smoke per task family runs on the 8 simulated devices."""
  c = config_lib.load_config(f"{ROOT}/configs/finetune/{dataset}.py:{arg}")
  return config_lib.apply_overrides(c, [f"data.dir={data_dir!r}", *([] if all_devices else ["mesh.num_devices=1"]), *sets])


@pytest.mark.parametrize("dataset", ["eurosat", "resisc45"])
def test_smoke_config_trains_and_reports_overall_accuracy(scene_data, dataset, tmp_path):
  from mtp_jax.train import loop
  _, out, _ = scene_data
  results = loop.train_and_evaluate(smoke_config(dataset, out, all_devices=dataset == "eurosat"), str(tmp_path))
  losses = [h["loss"] for h in results["train"]["history"]]
  assert losses[-1] < losses[0] - 0.2, losses   # from chance level (ln 10, ln 45), 30 steps
  r = results["eval"][dataset]["cls"]
  n_valid = json.load(open(os.path.join(out, dataset, "valid", "dataset_info.json")))["num_examples"]
  assert r["images"] == n_valid == {"eurosat": 19, "resisc45": 180}[dataset]
  assert r["overall_accuracy"] > 2 / len(r["accuracy_per_class"])   # well above chance
  assert set(r["accuracy_per_class"]) == set(scene_folders.EUROSAT_CLASSES if dataset == "eurosat"
                                              else scene_folders.RESISC45_CLASSES)
  report = open(tmp_path / "report.md").read()
  assert "top-1 OA" in report and os.path.isfile(tmp_path / "report" / f"{dataset}_cls_confusion.png")
  metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert any(f"eval/{dataset}/cls/overall_accuracy" in m for m in metrics)
  if dataset == "eurosat":   # prediction: a mosaic of 4 images labelled window by window
    _predict_scene_labels(tmp_path, os.path.join(scene_data[0], "2750"))


def _predict_scene_labels(workdir, folder):
  """Four EuroSAT images side by side (128 x 128), classified by 64-px windows (each resized as
  the evaluation resizes): each window gets the label and probabilities of its image alone."""
  from PIL import Image
  from mtp_jax.predict import Predictor, predict_scene
  paths = [os.path.join(folder, c, f"{c}_1.jpg") for c in ("Forest", "River", "SeaLake", "Highway")]
  images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
  assert all(i.shape == (64, 64, 3) for i in images)
  Image.fromarray(np.concatenate([np.concatenate(images[:2], 1), np.concatenate(images[2:], 1)], 0)).save(
      workdir / "mosaic.png")
  predictor = Predictor.from_workdir(str(workdir))
  out = str(workdir / "predicted")
  tiles = predict_scene(predictor, str(workdir / "mosaic.png"), out, window=64, progress=False)["tasks"]["cls"]["tiles"]
  assert [(t["x"], t["y"]) for t in tiles] == [(0, 0), (64, 0), (0, 64), (64, 64)]
  for k, (tile, image) in enumerate(zip(tiles, images)):
    Image.fromarray(image).save(workdir / f"alone{k}.png")   # the mosaic's pixels (JPEG decoders differ)
    alone = predict_scene(predictor, str(workdir / f"alone{k}.png"), out, progress=False)["tasks"]["cls"]["tiles"]
    assert len(alone) == 1 and alone[0]["class"] == tile["class"]
    np.testing.assert_allclose([p for _, p in alone[0]["top5"]], [p for _, p in tile["top5"]], atol=1e-5)


def test_training_examples_go_through_randaugment_in_mmpretrains_order(scene_data):
  """The paper's configs (data.rand_augment = 2) run crop, flip, RandAugment (filled with the
  rounded mean), erasing, in that order on one generator; the smoke leaves RandAugment out."""
  import grain
  from data_pipelines import sources
  from data_pipelines.downstream import classification, rand_augment
  _, out, _ = scene_data
  for name in ("eurosat", "resisc45"):
    assert config_lib.load_config(f"{ROOT}/configs/finetune/{name}.py").data.rand_augment == 2
  c = smoke_config("eurosat", out, "data.rand_augment=2")
  assert smoke_config("eurosat", out).data.rand_augment == 0
  parse = sources.source(c)._parse(c)
  path = os.path.join(out, "eurosat", "train")
  shard = json.load(open(os.path.join(path, "dataset_info.json")))["shards"][0]["file"]
  raws = list(grain.experimental.TFRecordIterDataset(os.path.join(path, shard)))[:6]
  changed = 0
  for seed, raw in enumerate(raws):
    got = parse(raw, rng=np.random.default_rng(seed))["image"]
    rng = np.random.default_rng(seed)
    image = classification.random_resized_crop(schema.decode_image(schema.decode(raw)), rng, 64)
    if rng.uniform() < 0.5:
      image = image[:, ::-1]
    image = rand_augment.rand_augment(np.ascontiguousarray(image), rng, num_policies=2, pad_val=(124, 116, 104))
    want = classification.random_erasing(image, rng, c.data.mean, c.data.std)
    np.testing.assert_array_equal(got, want)
    plain = sources.source(c)._parse(smoke_config("eurosat", out))(raw, rng=np.random.default_rng(seed))["image"]
    changed += not np.array_equal(plain, got)
  assert changed >= 3   # RandAugment skips each op with p 0.5: most images differ


def test_frozen_finetune_from_a_pretraining_workdir_keeps_every_encoder_tensor(scene_data, mtp_run, tmp_path):
  """Starts from the shared pretraining run's workdir at its image size: every encoder tensor is
  carried over exactly, and with model.freeze_encoder it is still bit-identical after training
  while the head moved."""
  from mtp_jax.train import loop
  _, out, _ = scene_data
  pretrain_dir, _ = mtp_run
  before, _, _, _ = read_checkpoint(pretrain_dir)
  c = smoke_config("eurosat", out, *TINY_ENCODER, f"model.encoder_init={pretrain_dir!r}",
                   f"data.image_size={SAMPLE_SIZE}", "train.num_steps=6", "train.log_every=2",
                   arg="smoke+frozen")
  results = loop.train_and_evaluate(c, str(tmp_path))
  after, _, _, _ = read_checkpoint(str(tmp_path))
  pre, post = flat(before["encoder"]), flat(after["encoder"])
  assert set(pre) == set(post)
  for k in pre:
    np.testing.assert_array_equal(post[k], pre[k], err_msg=str(k))
  head = after["heads"]["cls"]["fc"]["eurosat"]["kernel"]
  assert np.abs(head).max() > 0 and results["train"]["history"][-1]["grad_norm"] > 0


def test_encoder_init_from_a_workdir_resizes_pos_embed_bicubically(scene_data, mtp_run):
  """At 128 px (16 x 16 tokens, pretrained at 8 x 8) pos_embed is PyTorch's bicubic resize of the
  pretrained one; every other tensor is carried exactly. A named checkpoint folder works too."""
  from mtp_jax.parallel import sharding
  from mtp_jax import experiment
  from mtp_jax.train import loop
  _, out, _ = scene_data
  pretrain_dir, _ = mtp_run
  params, _, _, step = read_checkpoint(pretrain_dir)
  c = smoke_config("eurosat", out, *TINY_ENCODER, "data.image_size=128",
                   f"model.encoder_init={os.path.join(pretrain_dir, 'checkpoints', str(step))!r}")
  tasks = experiment.tasks(c)
  trainer = loop.Trainer(c, tasks, sharding.config_mesh(c.mesh))
  state = loop.fresh_state(c, trainer)
  from flax import nnx
  got, want = flat(nnx.to_pure_dict(state.params)["encoder"]), flat(params["encoder"])
  assert set(got) == set(want)
  pe = torch.from_numpy(np.asarray(want[("pos_embed",)])).reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(pe, size=(16, 16), mode="bicubic", align_corners=False)
  np.testing.assert_allclose(got[("pos_embed",)], ref.permute(0, 2, 3, 1).reshape(1, 256, -1).numpy(),
                             rtol=1e-5, atol=1e-6)
  for k in want:
    if k != ("pos_embed",):
      np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))


def test_finetune_configs_refuse_wrong_datasets_and_tasks(scene_data):
  _, out, _ = scene_data
  from mtp_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="data.subsets .* must be \\('eurosat',\\)"):
    smoke_config("eurosat", out, "data.subsets=('sota',)")
  with pytest.raises(ConfigError, match="tasks \\['ss'\\] are enabled, but data.dataset 'eurosat' serves only"):
    smoke_config("eurosat", out, "tasks.ss.enabled=True")
  with pytest.raises(ConfigError, match="data.dataset 'nope'"):
    smoke_config("eurosat", out, "data.dataset='nope'")
  with pytest.raises(ConfigError, match="unknown option"):
    config_lib.load_config(f"{ROOT}/configs/finetune/eurosat.py:tiny")


# ----------------------------------------------------------------------------------------------
# Multispectral: EuroSAT's 13-band release, N-band models started from an RGB checkpoint
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ms_data(tmp_path_factory):
  """A tiny 13-band EuroSAT release (uint16 TIFFs, bands last) with one band-first file, one of
  12 bands and one of float pixels; converted."""
  import tifffile
  raw = str(tmp_path_factory.mktemp("ms_raw"))
  out = str(tmp_path_factory.mktemp("ms_tfrecords"))
  top = synthetic.write_scene_release("eurosat_ms", raw, per_class=5, seed=6)
  planar = tifffile.imread(os.path.join(top, "Forest", "Forest_1.tif"))
  one_page = dict(photometric="minisblack", planarconfig="contig")
  tifffile.imwrite(os.path.join(top, "Forest", "Forest_1.tif"), np.moveaxis(planar, -1, 0),
                   photometric="minisblack", planarconfig="separate")
  tifffile.imwrite(os.path.join(top, "River", "River_2.tif"), planar[..., :12], **one_page)
  tifffile.imwrite(os.path.join(top, "SeaLake", "SeaLake_3.tif"), planar.astype(np.float32), **one_page)
  log = []
  convert_cli.convert_release(convert_cli.RELEASES["eurosat_ms"], raw, out, seed=0, log=log.append)
  return top, out, planar, log


def test_multiband_release_is_stored_raw_with_every_band(ms_data, tmp_path):
  import tifffile
  top, out, planar, _ = ms_data
  infos = {s: json.load(open(os.path.join(out, "eurosat_ms", s, "dataset_info.json"))) for s in ("train", "valid", "test")}
  skipped = {k["sample"]: k["reason"] for s in infos.values() for k in s["skipped"]}
  assert skipped.keys() == {"River/River_2.tif", "SeaLake/SeaLake_3.tif"}
  assert "(64, 64, 12) pixels, not 13 bands" in skipped["River/River_2.tif"]
  assert "float32, not uint16" in skipped["SeaLake/SeaLake_3.tif"]
  records = [r for s in infos.values() for shard in s["shards"]
             for r in read_records(os.path.join(out, "eurosat_ms", s["split"], shard["file"]))]
  assert len(records) == 50 - 2
  for r in records:
    assert (r.image_format, r.dtype, r.channels, r.height, r.width) == ("raw", "uint16", 13, 64, 64)
    want = planar if r.filename == "Forest/Forest_1.tif" else tifffile.imread(os.path.join(top, r.filename))
    np.testing.assert_array_equal(schema.decode_image(r), want, err_msg=r.filename)   # band-first read band-last
  # The RGB release of the same scenes, split with the same seed: the same scenes train.
  synthetic.write_scene_release("eurosat", str(tmp_path), per_class=5, seed=6)
  rgb_train = scene_folders.EUROSAT.splits(str(tmp_path), seed=0)[0]["train"]
  assert [p.replace(".tif", ".jpg") for p in infos["train"]["signature"]["samples"]] == [p for p, _ in rgb_train]


def test_rgb_kernels_go_to_the_named_bands_or_are_repeated_over_all():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(4, 3, 2, 2)).astype(np.float32)
  sd, rule = torch_convert.adapt_input_bands({"patch_embed.proj.weight": w, "pos_embed": 1}, 5, (3, 2, 1))
  got = sd["patch_embed.proj.weight"]
  assert got.shape == (4, 5, 2, 2) and "bands (3, 2, 1)" in rule and sd["pos_embed"] == 1
  np.testing.assert_array_equal(got[:, [3, 2, 1]], w)
  assert not got[:, [0, 4]].any()
  # A 5-band image whose bands 3, 2, 1 are an RGB image: the same patch response as the RGB model.
  image = rng.normal(size=(5, 2, 2))
  np.testing.assert_allclose(np.einsum("ochw,chw->o", got, image),
                             np.einsum("ochw,chw->o", w, image[[3, 2, 1]]), rtol=1e-5)
  sd, rule = torch_convert.adapt_input_bands({"patch_embed.proj.weight": w}, 4)
  np.testing.assert_allclose(sd["patch_embed.proj.weight"], w[:, [0, 1, 2, 0]] * 0.75)
  assert "timm" in rule
  assert torch_convert.adapt_input_bands({"patch_embed.proj.weight": w}, 3) == ({"patch_embed.proj.weight": w}, "")
  with pytest.raises(CheckpointError, match="3 different band indices in \\[0, 5\\)"):
    torch_convert.adapt_input_bands({"patch_embed.proj.weight": w}, 5, (3, 3, 1))
  with pytest.raises(CheckpointError, match="has 4 input bands and the model 5"):
    torch_convert.adapt_input_bands({"patch_embed.proj.weight": w[:, [0, 1, 2, 0]]}, 5)


def test_multiband_configs_check_the_bands(ms_data):
  from mtp_jax.errors import ConfigError
  _, out, _, _ = ms_data
  c = smoke_config("eurosat_ms", out)
  assert len(c.data.mean) == 13 and tuple(c.model.rgb_bands) == (3, 2, 1)
  with pytest.raises(ConfigError, match="data.mean has 3 entries for the 13 bands the model sees"):
    smoke_config("eurosat_ms", out, "data.mean=(1., 2., 3.)", "data.std=(1., 2., 3.)")
  with pytest.raises(ConfigError, match="data.bands \\(3, 13\\): eurosat_ms images have 13 bands"):
    smoke_config("eurosat_ms", out, "data.bands=(3, 13)")
  with pytest.raises(ConfigError, match="data.mean has 13 entries for the 2 bands"):
    smoke_config("eurosat_ms", out, "data.bands=(3, 2)")
  with pytest.raises(ConfigError, match="in_chans: the encoder's input bands are len\\(data.mean\\)"):
    smoke_config("eurosat_ms", out, "model.encoder_overrides.in_chans=13")
  assert config_lib.load_config(f"{ROOT}/configs/finetune/eurosat_ms.py").data.rand_augment == 0
  with pytest.raises(ConfigError, match="rand_augment = 2: RandAugment's ops are defined on 8-bit RGB"):
    smoke_config("eurosat_ms", out, "data.rand_augment=2")


def test_multiband_finetune_from_an_rgb_pretraining(ms_data, mtp_run, tmp_path):
  """eurosat_ms:smoke+frozen from the shared (RGB) pretraining run: the 13-band uint16 pipeline
  trains and evaluates, and the frozen encoder shows the adapted patch embedding exactly (the RGB
  kernels on bands 3, 2, 1, zeros elsewhere) and every other tensor of the pretraining."""
  from mtp_jax.train import loop
  _, out, _, _ = ms_data
  pretrain_dir, _ = mtp_run
  before, _, _, _ = read_checkpoint(pretrain_dir)
  c = smoke_config("eurosat_ms", out, *TINY_ENCODER, f"model.encoder_init={pretrain_dir!r}",
                   "train.num_steps=6", "train.log_every=2", arg="smoke+frozen")
  results = loop.train_and_evaluate(c, str(tmp_path))
  r = results["eval"]["eurosat_ms"]["cls"]
  assert r["images"] == json.load(open(os.path.join(out, "eurosat_ms", "valid", "dataset_info.json")))["num_examples"]
  assert 0 <= r["overall_accuracy"] <= 1
  assert os.path.isfile(tmp_path / "report" / "eurosat_ms_predictions.png")   # drawn from bands 3, 2, 1
  after, _, _, _ = read_checkpoint(str(tmp_path))
  pre, post = flat(before["encoder"]), flat(after["encoder"])
  kernel = ("patch_embed", "proj", "kernel")   # (p, p, bands, D)
  assert pre[kernel].shape[2] == 3 and post[kernel].shape[2] == 13
  np.testing.assert_array_equal(post[kernel][:, :, [3, 2, 1]], pre[kernel])
  assert not post[kernel][:, :, [0, *range(4, 13)]].any()
  for k in pre:
    if k != kernel:
      np.testing.assert_array_equal(post[k], pre[k], err_msg=str(k))


# ----------------------------------------------------------------------------------------------
# Segmentation: SpaceNet v1 and LoveDA readers, slide inference, the smoke configs
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
  """Tiny SpaceNet v1 and LoveDA releases (native layouts) with faults, converted."""
  from PIL import Image
  raw = tmp_path_factory.mktemp("seg_raw")
  out = str(tmp_path_factory.mktemp("seg_tfrecords"))
  sn, lv = str(raw / "AOI_1_Rio"), str(raw / "LoveDA")
  synthetic.write_spacenet1(sn, images=10, seed=3)
  synthetic.write_loveda(lv, per_domain=3, seed=4)
  os.remove(os.path.join(sn, "geojson", "Geo_AOI_1_RIO_img10.geojson"))          # no labels
  Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(os.path.join(sn, "3band", "3band_AOI_1_RIO_img11.tif"))
  with open(os.path.join(sn, "geojson", "Geo_AOI_1_RIO_img11.geojson"), "w") as f:
    json.dump({"type": "FeatureCollection", "features": []}, f)                   # no geotransform
  Image.fromarray(np.ones((50, 50), np.uint8)).save(os.path.join(lv, "Val", "Urban", "masks_png", "9.png"))
  Image.fromarray(np.full((96, 96), 9, np.uint8)).save(os.path.join(lv, "Val", "Urban", "masks_png", "10.png"))
  log = []
  for name in ("spacenet1", "loveda"):
    convert_cli.convert_release(convert_cli.RELEASES[name], str(raw / ("AOI_1_Rio" if name == "spacenet1" else "LoveDA")),
                                out, log=log.append)
  return sn, lv, out, log


def test_spacenet_buildings_are_rasterised_with_the_geotransform(seg_data):
  from shapely.geometry import Point, shape
  from data_pipelines.downstream.segmentation_releases import SPACENET1, geotransform
  from PIL import Image
  sn, _, out, _ = seg_data
  infos = {s: json.load(open(os.path.join(out, "spacenet1", s, "dataset_info.json"))) for s in ("train", "valid")}
  reasons = {x["sample"]: x["reason"] for s in infos.values() for x in s["skipped"]}
  assert "no geojson/Geo_AOI_1_RIO_img10.geojson" in reasons["3band/3band_AOI_1_RIO_img10.tif"]
  assert "no geotransform" in reasons["3band/3band_AOI_1_RIO_img11.tif"]
  assert infos["train"]["num_examples"] + infos["valid"]["num_examples"] == 9
  records = [r for s in infos for sh in infos[s]["shards"]
             for r in read_records(os.path.join(out, "spacenet1", s, sh["file"]))]
  assert infos["train"]["class_names"] == ["building"] and len(records) == 9
  for record in records[:3]:
    tif = Image.open(os.path.join(sn, record.filename))
    np.testing.assert_array_equal(schema.decode_image(record), np.asarray(tif))   # lossless
    x0, dx, y0, dy = geotransform(tif, record.filename)
    number = record.filename.split("img")[1].split(".")[0]
    polygons = [shape(f["geometry"]) for f in json.load(open(os.path.join(sn, "geojson", f"Geo_AOI_1_RIO_img{number}.geojson")))["features"]]
    label = schema.decode_semantic(record)
    want = np.zeros_like(label)
    for r in range(label.shape[0]):
      for c in range(label.shape[1]):
        centre = Point(x0 + (c + 0.5) * dx, y0 + (r + 0.5) * dy)
        want[r, c] = any(p.contains(centre) for p in polygons)
    assert label.max() == 1 and (label == want).mean() > 0.999   # exact but for boundary ties
  again = SPACENET1.splits(sn, seed=0)[0]
  assert [p for p, _ in again["valid"]] == infos["valid"]["signature"]["samples"]


def test_loveda_labels_drop_the_no_data_value(seg_data):
  _, lv, out, _ = seg_data
  infos = {s: json.load(open(os.path.join(out, "loveda", s, "dataset_info.json"))) for s in ("train", "valid")}
  assert infos["train"]["class_names"] == ["building", "road", "water", "barren", "forest", "agricultural"]
  assert infos["train"]["num_examples"] == 6 and infos["valid"]["num_examples"] == 4   # 2 skipped
  reasons = {x["sample"]: x["reason"] for x in infos["valid"]["skipped"]}
  # images 9 and 10 of Val/Urban: a 50x50 mask and a mask value of 9 (the fixture wrote 6 images
  # per split, numbered 0..11; Val holds 6..11, Urban 9..11).
  assert "50x50" in reasons["Val/Urban/images_png/9.png"] and "value 9" in reasons["Val/Urban/images_png/10.png"]
  from PIL import Image
  record = read_records(os.path.join(out, "loveda", "train", infos["train"]["shards"][0]["file"]))[0]
  raw = np.asarray(Image.open(os.path.join(lv, record.filename.replace("images_png", "masks_png"))))
  label = schema.decode_semantic(record)
  np.testing.assert_array_equal(label[raw == 0], 255)
  np.testing.assert_array_equal(label[raw > 0], raw[raw > 0] - 1)


def test_loveda_objects_style_draws_the_samrs_sample_classes(tmp_path):
  """The notebook's finetuning fixture: LoveDA classes 2..7 are the SAMRS sample's classes 0..5
  (their colour, plain or striped), 1 its ground; the release's layout; the same seed, the same bytes."""
  from PIL import Image
  from data_pipelines.samrs.synthetic import class_appearance
  from data_pipelines.downstream.segmentation_releases import LOVEDA
  synthetic.write_loveda(str(tmp_path / "a"), per_domain=2, seed=5, size=64, style="objects")
  synthetic.write_loveda(str(tmp_path / "b"), per_domain=2, seed=5, size=64, style="objects")
  splits, foreign = LOVEDA.splits(str(tmp_path / "a"))
  assert not foreign and [len(splits[s]) for s in ("train", "valid")] == [4, 4]
  seen = set()
  for relative, _ in splits["train"] + splits["valid"]:
    for folder in ("images_png", "masks_png"):
      path = relative.replace("/images_png/", f"/{folder}/")
      assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()
    image = np.asarray(Image.open(tmp_path / "a" / relative), np.float64)
    mask = np.asarray(Image.open(tmp_path / "a" / relative.replace("/images_png/", "/masks_png/")))
    assert (mask[:2] == 0).all() and (mask[:, :2] == 0).all() and mask[2:, 2:].min() >= 1 and mask.max() <= 7
    for value in np.unique(mask[2:, 2:]):
      seen.add(int(value))
      if value == 1:
        continue
      colour = class_appearance(int(value) - 2, 6)[0] * 255
      pixels = image[mask == value]
      error = np.minimum(np.abs(pixels - colour).max(-1), np.abs(pixels - 0.65 * colour).max(-1))
      assert np.median(error) < 8, (relative, value)   # 1.5 % noise; edges are rounded
    record = LOVEDA.read(str(tmp_path / "a"), relative)
    np.testing.assert_array_equal(schema.decode_semantic(record), np.where(mask == 0, 255, mask.astype(int) - 1))
  assert 1 in seen and len(seen - {1}) >= 3
  with pytest.raises(ValueError, match="style 'stripes'"):
    synthetic.write_loveda(str(tmp_path / "c"), style="stripes")



def mmseg_slide(predict, image, window, stride):
  """numpy transcription of mmseg's EncoderDecoder.slide_inference on one (H, W, C) image."""
  h, w = image.shape[:2]
  ny = max(h - window + stride - 1, 0) // stride + 1
  nx = max(w - window + stride - 1, 0) // stride + 1
  total, count = None, np.zeros((h, w, 1))
  for iy in range(ny):
    for ix in range(nx):
      y1, x1 = iy * stride, ix * stride
      y2, x2 = min(y1 + window, h), min(x1 + window, w)
      y1, x1 = max(y2 - window, 0), max(x2 - window, 0)
      logits = predict(image[None, y1:y2, x1:x2])[0]
      total = np.zeros((h, w, logits.shape[-1])) if total is None else total
      total[y1:y2, x1:x2] += logits
      count[y1:y2, x1:x2] += 1
  return total / count


def test_slide_inference_equals_mmseg_on_padded_canvases():
  import jax.numpy as jnp
  from mtp_jax.models.slide import slide_logits
  rng = np.random.default_rng(0)
  window, stride, canvas = 16, 12, 40
  def model(x):   # depends on the content and on the position inside the window
    ramp = np.arange(window, dtype=np.float32)[None, :, None, None] / window
    return np.concatenate([x[..., :1] * (1 + ramp), x[..., 1:2] - ramp], axis=-1)
  sizes = [(40, 40), (29, 37), (16, 16), (33, 16)]   # rows interleave two subsets: a, b, a, b
  images = np.zeros((4, canvas, canvas, 3), np.float32)
  for i, (h, w) in enumerate(sizes):
    images[i, :h, :w] = rng.normal(size=(h, w, 3))
  predict = lambda x: {"ss": {"a": jnp.asarray(model(np.asarray(x)))[0::2],
                              "b": jnp.asarray(model(np.asarray(x)))[1::2]}}
  got = slide_logits(predict, jnp.asarray(images), jnp.asarray(sizes, jnp.int32), window, stride, ("a", "b"))
  for i, (h, w) in enumerate(sizes):
    want = mmseg_slide(model, images[i, :h, :w], window, stride)
    np.testing.assert_allclose(np.asarray(got["ss"]["ab"[i % 2]][i // 2])[:h, :w], want, rtol=1e-5, atol=1e-6)
    assert not np.asarray(got["ss"]["ab"[i % 2]][i // 2])[h:].any()


def test_slide_inference_equals_whole_image_inference_where_one_window_covers(seg_data):
  """The eval step's slide path (one window per image) and its whole-image path give the same
  confusion matrix on the converted SpaceNet sample, with an initialised model."""
  import jax
  from data_pipelines import sources
  from flax import nnx
  from mtp_jax import experiment
  from mtp_jax.train import step as step_lib
  _, _, out, _ = seg_data
  c = smoke_config("spacenet1", out, "eval.image_size=96", "data.image_size=96", "eval.slide_window=96",
                   "eval.slide_stride=64", "model.drop_path_rate=0.0")
  tasks = experiment.tasks(c)
  model = experiment.model(c, tasks, nnx.Rngs(0))
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  raw = next(iter(sources.source(c).eval_dataset(c, "spacenet1", tasks, 2, "valid")))
  host = {"image": raw["image"], "gt": {"spacenet1": {k: raw[k] for k in ("semantic", "is_real", "image_hw")}}}
  slide = jax.jit(step_lib.make_eval_step(graphdef, tasks, (96, 64), ("spacenet1",)))(params, stats, host)
  whole = jax.jit(step_lib.make_eval_step(graphdef, tasks))(params, stats, host)
  np.testing.assert_array_equal(slide["ss"][0]["spacenet1"].matrix, whole["ss"][0]["spacenet1"].matrix)
  assert int(whole["ss"][0]["spacenet1"].matrix.sum()) == int((raw["semantic"][raw["is_real"]] != 255).sum()) > 0


@pytest.mark.parametrize("dataset", ["spacenet1", "loveda"])
def test_segmentation_smoke_config_trains_and_reports_miou(seg_data, dataset, tmp_path):
  from mtp_jax.train import loop
  _, _, out, _ = seg_data
  c = smoke_config(dataset, out, "eval.image_size=96", all_devices=dataset == "spacenet1")
  assert (c.eval.slide_window, c.eval.slide_stride, c.tasks.ss.enabled) == (64, 48, True)
  results = loop.train_and_evaluate(c, str(tmp_path))
  losses = [h["loss"] for h in results["train"]["history"]]
  assert losses[-1] < 0.7 * losses[0], losses
  r = results["eval"][dataset]["ss"]
  assert 0 < r["miou"] <= 1 and list(r["iou_per_class"])[0] == "background"
  assert len(r["iou_per_class"]) == {"spacenet1": 2, "loveda": 7}[dataset]
  labelled = {"spacenet1": None, "loveda": 4 * (94 * 94)}[dataset]   # 4 usable Val images, no-data border
  if labelled:
    assert r["pixels"] == labelled
  assert "mIoU" in open(tmp_path / "report.md").read()


# ----------------------------------------------------------------------------------------------
# Change detection: the pair releases, the siamese model, the smoke configs
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cd_data(tmp_path_factory):
  """LEVIR-CD (128-px pairs cut into 64-px tiles here), WHU-CD and CDD (JPEG labels) fixtures."""
  from PIL import Image
  from data_pipelines.downstream.change_releases import PairRelease
  raw, out = tmp_path_factory.mktemp("cd_raw"), str(tmp_path_factory.mktemp("cd_tfrecords"))
  synthetic.write_change_pairs(str(raw / "levir"), per_split=3, size=128, seed=5)
  synthetic.write_change_pairs(str(raw / "cdd"), "OUT", per_split=6, size=64, seed=6, suffix=".jpg")
  os.remove(raw / "levir" / "val" / "B" / "val_2.png")                               # a missing date
  Image.fromarray(np.zeros((64, 64), np.uint8)).save(raw / "levir" / "test" / "label" / "test_2.png")
  releases = {"levir_cd": PairRelease("levir_cd", "label", (".png",), tile=64),
              "cdd": convert_cli.RELEASES["cdd"]}
  log = []
  for name, release in releases.items():
    convert_cli.convert_release(release, str(raw / name.split("_")[0]), out, log=log.append)
  return raw, out, log


def test_change_pairs_are_read_tiled_and_binarised(cd_data):
  raw, out, _ = cd_data
  from PIL import Image
  info = {s: json.load(open(os.path.join(out, "levir_cd", s, "dataset_info.json"))) for s in ("train", "valid", "test")}
  assert [info[s]["num_examples"] for s in ("train", "valid", "test")] == [12, 8, 8]   # 4 tiles per pair
  assert "date B image is missing" in info["valid"]["skipped"][0]["reason"]
  assert "label is 64x64, the images 128x128" in info["test"]["skipped"][0]["reason"]
  records = read_records(os.path.join(out, "levir_cd", "train", info["train"]["shards"][0]["file"]))
  tile = records[1]   # train_0, tile row 0 column 1
  assert tile.filename == "train/A/train_0_0_1.png" and (tile.height, tile.width) == (64, 64)
  a = np.asarray(Image.open(raw / "levir" / "train" / "A" / "train_0.png"))
  b = np.asarray(Image.open(raw / "levir" / "train" / "B" / "train_0.png"))
  label = np.asarray(Image.open(raw / "levir" / "train" / "label" / "train_0.png"))
  np.testing.assert_array_equal(schema.decode_image(tile, 1), a[:64, 64:])
  np.testing.assert_array_equal(schema.decode_image(tile, 2), b[:64, 64:])
  np.testing.assert_array_equal(schema.decode_semantic(tile), (label[:64, 64:] >= 128).astype(np.uint8))
  cdd = read_records(os.path.join(out, "cdd", "test", "cdd-test.tfrecord-00000-of-00001"))
  assert len(cdd) == 6 and set(np.unique(schema.decode_semantic(cdd[0]))) <= {0, 1}


def test_change_detection_smoke_trains_and_reports_f1(cd_data, tmp_path):
  from mtp_jax.train import loop
  _, out, _ = cd_data
  full = config_lib.load_config(f"{ROOT}/configs/finetune/levir_cd.py")
  assert (full.data.image_size, tuple(full.tasks.cd.decoder_channels), full.eval.split) == (256, (512, 256, 128, 64), "test")
  c = smoke_config("levir_cd", out, "data.image_size=64", "train.num_steps=40", "optimizer.lr=2e-3", all_devices=True)
  assert c.tasks.cd.enabled and c.data.image_size == 64
  results = loop.train_and_evaluate(c, str(tmp_path))
  losses = [h["loss"] for h in results["train"]["history"]]
  assert losses[-1] < 0.7 * losses[0], losses
  r = results["eval"]["levir_cd"]["cd"]
  assert r["pixels"] == 8 * 64 * 64 and r["f1"] > 0.3, r   # a fifth of the pixels changed
  assert "F1 (changed)" in open(tmp_path / "report.md").read()

  # Prediction on a whole 128-px test pair (3 x 3 windows of 64 px, logits averaged): its change
  # map finds the changes about as well as the evaluation did on tiles (F1 > 0.3); the dates in
  # the wrong order or one date twice would not.
  from PIL import Image
  from mtp_jax.predict import Predictor, predict_scene
  raw = cd_data[0] / "levir" / "test"
  predictor = Predictor.from_workdir(str(tmp_path))
  summary = predict_scene(predictor, str(raw / "A" / "test_0.png"), str(tmp_path / "predicted"),
                          path2=str(raw / "B" / "test_0.png"), progress=False)
  assert summary["tiles"] == 9 and summary["tasks"]["cd"]["classes"] == ["unchanged", "changed"]
  predicted = np.asarray(Image.open(tmp_path / "predicted" / "test_0_cd.png")) == 1
  truth = np.asarray(Image.open(raw / "label" / "test_0.png")) >= 128
  f1 = 2 * (predicted & truth).sum() / max(predicted.sum() + truth.sum(), 1)
  assert f1 > 0.3, f1


# ----------------------------------------------------------------------------------------------
# OSCD: the Onera folders, 13 Sentinel-2 bands per date, 96-px tiles resized to the input size
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oscd_data(tmp_path_factory):
  """Five cities of 100 x 112 px (2 x 2 tiles of 96 each): lasvegas lacks a date-2 band, and
  montpellier is in neither list; converted."""
  import shutil
  raw, out = tmp_path_factory.mktemp("oscd_raw"), str(tmp_path_factory.mktemp("oscd_tfrecords"))
  synthetic.write_oscd(str(raw), train=("abudhabi", "beihai", "bercy"), test=("brasilia", "lasvegas"), seed=8)
  images = raw / synthetic.OSCD_FOLDERS[0]
  os.remove(images / "lasvegas" / "imgs_2_rect" / "B08.tif")
  shutil.copytree(images / "bercy", images / "montpellier")
  log = []
  convert_cli.convert_release(convert_cli.RELEASES["oscd"], str(raw), out, log=log.append)
  return raw, out, log


def test_oscd_cities_are_read_band_by_band_and_tiled(oscd_data):
  import cv2
  import tifffile
  from PIL import Image
  raw, out, log = oscd_data
  from data_pipelines.downstream import sentinel2
  info = {s: json.load(open(os.path.join(out, "oscd", s, "dataset_info.json"))) for s in ("train", "test")}
  assert [info[s]["num_examples"] for s in ("train", "test")] == [12, 4]   # 4 tiles per city
  assert info["test"]["skipped"] == [{"sample": "test/lasvegas",
                                      "reason": "its date 2 band B08 is missing (lasvegas/imgs_2_rect/B08.tif)"}]
  assert any("montpellier" in line and "neither train.txt nor test.txt" in line for line in log)
  records = read_records(os.path.join(out, "oscd", "train", info["train"]["shards"][0]["file"]))
  tile = records[1]   # abudhabi, tile row 0 column 1: 16 columns of the city, 80 of padding
  assert tile.filename == "abudhabi/abudhabi_0_1" and (tile.dtype, tile.channels, tile.height) == ("uint16", 13, 96)
  city = raw / synthetic.OSCD_FOLDERS[0] / "abudhabi"
  a, b = schema.decode_image(tile, 1), schema.decode_image(tile, 2)
  b04 = tifffile.imread(city / "imgs_1_rect" / "B04.tif")
  np.testing.assert_array_equal(a[:, :16, 3], b04[:96, 96:])
  np.testing.assert_array_equal(b[:, :16, 7], tifffile.imread(city / "imgs_2_rect" / "B08.tif")[:96, 96:])
  b05 = cv2.resize(tifffile.imread(city / "imgs_1_rect" / "B05.tif").astype(np.float32), (112, 100),
                   interpolation=cv2.INTER_LINEAR)   # 20 m band on the 10 m grid
  np.testing.assert_array_equal(a[:, :16, sentinel2.BANDS.index("B05")], np.round(b05[:96, 96:]).astype(np.uint16))
  assert not a[:, 16:].any() and not b[:, 16:].any()
  label = np.asarray(Image.open(raw / synthetic.OSCD_FOLDERS[1] / "abudhabi" / "cm" / "cm.png"))
  got = schema.decode_semantic(tile)
  np.testing.assert_array_equal(got[:, :16], (label[:96, 96:] > 0).astype(np.uint8))
  assert (got[:, 16:] == 255).all() and (schema.decode_semantic(records[2])[4:] == 255).all()
  for where in (raw / "nowhere", raw / synthetic.OSCD_FOLDERS[1]):
    with pytest.raises(DataError, match="holds no OSCD release"):
      convert_cli.convert_release(convert_cli.RELEASES["oscd"], str(where), str(raw / "x"), log=lambda *_: None)
  with pytest.raises(DataError, match="montpellier.*neither train.txt nor test.txt"):
    convert_cli.convert_release(convert_cli.RELEASES["oscd"], str(raw), str(raw / "strict"), strict=True,
                               log=lambda *_: None)


def test_oscd_examples_take_the_configs_bands_and_size(oscd_data):
  """oscd.py: the RGB bands (B04, B03, B02) of each 96-px tile resized to 224; oscd_ms.py: all
  13; the smoke resizes to 64; training examples keep the pixel type and the ignored padding."""
  import cv2
  from data_pipelines import sources
  import grain
  _, out, _ = oscd_data
  path = os.path.join(out, "oscd", "test")
  raw_record = next(iter(grain.experimental.TFRecordIterDataset(
      os.path.join(path, json.load(open(os.path.join(path, "dataset_info.json")))["shards"][0]["file"]))))
  record = schema.decode(raw_record)
  for name, bands in (("oscd", (3, 2, 1)), ("oscd_ms", tuple(range(13)))):
    c = config_lib.apply_overrides(config_lib.load_config(f"{ROOT}/configs/finetune/{name}.py"), [f"data.dir={out!r}"])
    assert (c.data.resize, c.data.image_size, len(c.data.mean)) == (224, 224, len(bands))
    parse = sources.source(c)._parse(c)
    example = parse(raw_record)
    assert example["image"].shape == (2, 224, 224, len(bands)) and example["image"].dtype == np.uint16
    want = cv2.resize(schema.decode_image(record, 2)[..., bands[0]], (224, 224), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(example["image"][1, ..., 0], want)
    # Evaluation scores the 96-px label as converted (eval.label_size, as the original's OSCD)
    np.testing.assert_array_equal(example["semantic"], schema.decode_semantic(record))
    shapes = sources.source(c).example_shapes(c)
    assert shapes["image"] == ((2, 224, 224, len(bands)), np.dtype("uint16")) and shapes["semantic"][0] == (96, 96)
  smoke = smoke_config("oscd_ms", out)
  train = sources.source(smoke)._parse(smoke)(raw_record, rng=np.random.default_rng(0))
  assert train["image"].shape == (2, 64, 64, 13) and train["image"].dtype == np.uint16
  assert set(np.unique(train["semantic"])) <= {0, 1, 255}


def test_oscd_multiband_smoke_trains_and_reports_f1(oscd_data, tmp_path):
  from mtp_jax.train import loop
  _, out, _ = oscd_data
  c = smoke_config("oscd_ms", out, "optimizer.lr=2e-3")
  results = loop.train_and_evaluate(c, str(tmp_path))
  losses = [h["loss"] for h in results["train"]["history"]]
  assert losses[-1] < 0.7 * losses[0], losses
  r = results["eval"]["oscd"]["cd"]
  assert r["pixels"] > 0 and r["f1"] > 0.3, r
