"""Large-scene prediction (mtp_jax/predict): the tile grid, stitched segmentation against the
definition of slide inference and against whole-image inference, detections of a trained
detector on a scene several tiles wide against those on a crop, GeoTIFF / GeoJSON / GeoPackage
outputs against independent formulas, the CLI, and one clear error for each bad input with
nothing partial left behind."""

import json
import math
import os
import sqlite3

import numpy as np
import pytest
import rasterio
from flax import nnx
from PIL import Image

from mtp_jax.errors import DataError
from mtp_jax.models.slide import window_count
from mtp_jax.ops.iou import box_iou_rotated
from mtp_jax.predict import Predictor, pipeline, predict_scene
from mtp_jax.predict.__main__ import main as predict_main
from mtp_jax.predict.dense import DenseMerger
from mtp_jax.predict.tiles import TileGrid, starts

from conftest import SAMPLE_SIZE

S = SAMPLE_SIZE   # the tiny models' tile: 64 px


@pytest.fixture(scope="module")
def seg_rd(mtp_run):
  """The shared three-task run's model, predicting ss and rd for SOTA (8 tiles a batch)."""
  return Predictor.from_workdir(mtp_run[0], tasks=("ss", "rd"))


def random_scene(path, height, width, seed=0, bands=3):
  pixels = (np.random.default_rng(seed).random((height, width, bands)) * 255).astype(np.uint8)
  Image.fromarray(pixels if bands > 1 else pixels[..., 0]).save(path)
  return pixels


def test_tile_starts_are_mmsegs_windows_and_cover_the_scene():
  for size, window, stride in [(64, 64, 48), (150, 64, 48), (1000, 512, 384), (50, 64, 48), (129, 64, 64)]:
    got = starts(size, window, stride)
    assert len(got) == window_count(size, window, stride)
    assert got == [max(min(i * stride + window, size) - window, 0) for i in range(len(got))]
    covered = np.zeros(size, int)
    for y in got:
      covered[y:y + window] += 1
    assert covered.min() >= 1 and got[-1] + window >= size and (size < window or got[-1] + window == size)
  with pytest.raises(ValueError, match="leave pixels"):
    starts(100, 64, 65)
  assert len(TileGrid(150, 200, 64, 48)) == 3 * 4


@pytest.mark.parametrize("height,width,window,stride", [(150, 200, 64, 48), (300, 70, 64, 20), (64, 64, 64, 64),
                                                       (40, 90, 64, 48), (500, 64, 64, 7)])
def test_strip_merger_is_the_whole_canvas_average_for_any_grid(height, width, window, stride):
  """Random logits on grids with pushed-back last windows, scenes smaller than a window and
  strides far below the window: the strip merger (a window-high strip) gives exactly the
  whole-canvas sum / count."""
  rng = np.random.default_rng(height)
  grid = TileGrid(height, width, window, stride)
  got = np.full((height, width, 3), np.nan, np.float32)
  total, count = np.zeros((height, width, 3)), np.zeros((height, width, 1))

  def sink(y0, avg):
    assert np.isnan(got[y0:y0 + len(avg)]).all()   # each row once, top to bottom
    got[y0:y0 + len(avg)] = avg
  merger = DenseMerger(grid, 3, sink)
  for row in grid.rows():
    logits = rng.random((len(row), window, window, 3)).astype(np.float32)
    merger.add_row(row, logits)
    for t, patch in zip(row, logits):
      h, w = min(window, height - t.y), min(window, width - t.x)
      total[t.y:t.y + h, t.x:t.x + w] += patch[:h, :w]
      count[t.y:t.y + h, t.x:t.x + w] += 1
  merger.finish()
  np.testing.assert_allclose(got, total / count, rtol=1e-6, atol=1e-6)


def test_stitched_logits_are_the_mean_over_covering_tiles_and_one_window_is_whole_image(seg_rd, tmp_path):
  """The strip merger against the definition (every tile's logits added into a whole-scene
  canvas, divided by the count), on a 150 x 200 scene of 3 x 4 tiles; and on a scene of one
  window, the written class map is the argmax of whole-image inference."""
  pixels = random_scene(tmp_path / "scene.png", 150, 200)
  grid = TileGrid(150, 200, S, 48)
  total, count = np.zeros((150, 200, 19)), np.zeros((150, 200, 1))
  got = np.zeros((150, 200, 19), np.float32)

  def sink(y0, avg):
    got[y0:y0 + len(avg)] = avg
  merger = DenseMerger(grid, 19, sink)
  for row in grid.rows():
    logits = seg_rd(np.stack([pixels[t.y:t.y + S, t.x:t.x + S] for t in row]).astype(np.float32))["ss"]
    merger.add_row(row, logits)
    for t, patch in zip(row, logits):
      total[t.y:t.y + S, t.x:t.x + S] += patch
      count[t.y:t.y + S, t.x:t.x + S] += 1
  merger.finish()
  assert merger.sum.shape == (S, 200, 19)   # one strip of the window's height, never the scene
  np.testing.assert_allclose(got, total / count, rtol=1e-6, atol=1e-6)

  # The pipeline's class map of that scene is the argmax of the same average.
  summary = predict_scene(seg_rd, str(tmp_path / "scene.png"), str(tmp_path / "out"), progress=False)
  written = np.asarray(Image.open(tmp_path / "out" / "scene_ss.png"))
  assert summary["stride"] == 48 and summary["tiles"] == 12
  np.testing.assert_array_equal(written, np.argmax(total / count, axis=-1))

  # One window covers a 64 x 64 scene: the map is whole-image inference, and so is a smaller
  # (zero-padded) scene's, cropped.
  for h, w in [(S, S), (40, 56)]:
    pixels = random_scene(tmp_path / f"small{h}.png", h, w, seed=h)
    predict_scene(seg_rd, str(tmp_path / f"small{h}.png"), str(tmp_path / "out"), formats=("png",), progress=False)
    canvas = np.zeros((1, S, S, 3), np.float32)
    canvas[0, :h, :w] = pixels
    whole = np.argmax(seg_rd(canvas)["ss"][0], axis=-1)[:h, :w]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / f"small{h}_ss.png")), whole)


@pytest.fixture(scope="module")
def detector(rd_overfit):
  """The overfitted rd model (it finds the sample's objects), predicting for SOTA."""
  _, _, trainer, state, raw, _ = rd_overfit
  predictor = Predictor(trainer.config, nnx.to_pure_dict(state.params), nnx.to_pure_dict(state.batch_stats))
  return predictor, raw["sota"]


def test_detections_far_from_tile_borders_equal_the_crops_and_border_objects_are_found_once(detector, tmp_path):
  """A trained SOTA image pasted at (48, 48) into a 160 x 160 scene: windows start at 0, 48, 96
  on each axis, so one tile is exactly the image. Objects inside scene rows and columns 64-96
  are seen by that tile alone (the others end at 64 or start at 96): they get exactly the
  detections of inference on the image alone. Objects across the other tiles' borders (scene x
  or y = 64 or 96), seen cut by those tiles, are detected once."""
  predictor, raw = detector
  image = raw["image"][1]   # two objects inside 64-96, three across a border
  scene = np.zeros((160, 160, 3), np.uint8)
  scene[48:112, 48:112] = image
  Image.fromarray(scene).save(tmp_path / "scene.png")
  summary = predict_scene(predictor, str(tmp_path / "scene.png"), str(tmp_path / "out"), stride=48,
                          formats=("dota", "json"), progress=False)
  assert summary["tiles"] == 9
  # The scene's merged detections, read back from the DOTA Task1 files it wrote.
  from mtp_jax.metrics.submissions import read_dota_task1
  from mtp_jax.ops.boxes import poly_to_rbox
  names = predictor.class_names("rd")
  per_class = read_dota_task1(str(tmp_path / "out" / "scene_rd_dota"), names)["scene"]
  scene_dets = [(c, d[0], poly_to_rbox(d[1:].reshape(4, 2))) for c, ds in enumerate(per_class) for d in ds]

  crop = predictor(image[None].astype(np.float32))["rd"]
  crop_dets = [(int(crop["labels"][0, k]), float(crop["scores"][0, k]), crop["rboxes"][0, k] + [48, 48, 0, 0, 0])
               for k in np.flatnonzero(crop["valid"][0]) if crop["scores"][0, k] > 0.3]
  assert crop_dets
  interior = 0
  for label, score, rbox in crop_dets:
    corners = np.asarray(pipeline.out_lib.polygons("rboxes", rbox[None]))[0]
    if corners.min() > 64 + 1 and corners.max() < 96 - 1:   # inside tile (1, 1) only
      interior += 1
      same = [d for d in scene_dets if d[0] == label
              and box_iou_rotated(d[2][None], rbox[None].astype(np.float64), aligned=True)[0] > 0.99]
      assert len(same) == 1 and abs(same[0][1] - score) < 1e-5, (label, score, rbox)
  # The image has two objects inside 64-96; how many the overfitted model finds above 0.3 moves
  # with float rounding in its training (1 or 2 seen). Each one found is checked above.
  assert interior >= 1

  valid = raw["rbox_valid"][1]
  crossing = 0
  for rbox, label in zip(raw["rboxes"][1][valid], raw["labels"][1][valid]):
    box = rbox + np.array([48, 48, 0, 0, 0])
    corners = np.asarray(pipeline.out_lib.polygons("rboxes", box[None]))[0]
    if not any(corners[:, a].min() < b < corners[:, a].max() for a in (0, 1) for b in (64, 96)):
      continue
    crossing += 1
    same_class = [d for d in scene_dets if d[0] == label]
    ious = box_iou_rotated(np.repeat(box[None], len(same_class), 0), np.stack([d[2] for d in same_class]),
                           aligned=True) if same_class else np.zeros(0)
    assert (ious > 0.5).sum() == 1 and (ious > 0.1).sum() == 1, (label, box, ious)
  assert crossing >= 3


def test_merging_keeps_one_detection_per_object_across_tiles():
  """Two tiles (at x 0 and 48) both see an object whole, and a third box is the object cut by a
  tile border: one detection remains, the best-scored, in scene pixels; another class and a
  distant object survive. Horizontal boxes alike, with IoU > 0.5 suppressing."""
  from mtp_jax.predict.detections import DetectionMerger
  from mtp_jax.predict.tiles import Tile
  def outputs(boxes, scores, labels, key):
    n = len(boxes)
    return {key: np.asarray(boxes, np.float32)[None], "scores": np.asarray(scores, np.float32)[None],
            "labels": np.asarray(labels, np.int32)[None], "valid": np.ones((1, n), bool)}
  merger = DetectionMerger("rboxes", 3)
  # the object at scene (56, 20), 12 x 6 px, angle 0.3: tile 0 sees it at x 56, tile 1 at x 8
  merger.add(Tile(0, 0, 0, 0), outputs([[56.0, 20, 12, 6, 0.3], [58.5, 20, 7, 6, 0.3], [10, 10, 5, 5, 0]],
                                       [0.8, 0.95, 0.5], [1, 2, 1], "rboxes"), 0)
  merger.add(Tile(0, 1, 0, 48), outputs([[8.0, 20, 12, 6, 0.3], [6.0, 20, 8, 6, 0.3], [40, 40, 5, 5, 0]],
                                        [0.9, 0.7, 0.6], [1, 1, 1], "rboxes"), 0)
  result = merger.result()
  assert len(merger.pooled()["scores"]) == 6
  np.testing.assert_allclose(result["scores"], [0.95, 0.9, 0.6, 0.5], rtol=1e-6)
  np.testing.assert_array_equal(result["labels"], [2, 1, 1, 1])
  np.testing.assert_allclose(result["boxes"][1], [56, 20, 12, 6, 0.3], rtol=1e-6)   # tile 1's, moved by 48
  np.testing.assert_allclose(result["boxes"][2], [88, 40, 5, 5, 0], rtol=1e-6)

  merger = DetectionMerger("hboxes", 2)
  merger.add(Tile(0, 0, 0, 0), outputs([[50, 10, 62, 20], [54, 10, 64, 20]], [0.7, 0.6], [0, 0], "hboxes"), 0)
  merger.add(Tile(1, 0, 48, 48), outputs([[2, -38, 14, -28], [30, 30, 40, 40]], [0.9, 0.4], [0, 0], "hboxes"), 0)
  result = merger.result()
  # [54, 10, 64, 20] overlaps the kept box by 8/14 = 0.57 > 0.5: suppressed; the first tile's
  # copy of the object (IoU 1 with tile 2's, moved by (48, 48)) too.
  np.testing.assert_allclose(result["scores"], [0.9, 0.4], rtol=1e-6)
  np.testing.assert_allclose(result["boxes"], [[50, 10, 62, 20], [78, 78, 88, 88]])


def test_instance_masks_become_polygons_that_follow_their_boxes(tmp_path):
  """A Mask R-CNN detection (box 20 px wide, a disk in its 28 x 28 mask) in the tile at x = 48:
  pasted as mmdet pastes it and traced, its polygon is the disk (area within a contour's
  half-pixel erosion of pi r^2, centre at the box centre in scene pixels), kept with its box
  through the merge (a duplicate with a lower score goes, its polygon with it), and written to
  GeoJSON and GeoPackage as that polygon."""
  from rasterio.transform import Affine
  from mtp_jax.predict import outputs as out_lib
  from mtp_jax.predict.detections import DetectionMerger
  from mtp_jax.predict.tiles import Tile
  yy, xx = np.mgrid[:28, :28] + 0.5
  disk = ((xx - 14) ** 2 + (yy - 14) ** 2 <= 12 ** 2).astype(np.float32)
  outputs = {"hboxes": np.array([[[10, 10, 30, 30], [11, 10, 31, 30]]], np.float32),
             "scores": np.array([[0.9, 0.6]], np.float32), "labels": np.array([[1, 1]], np.int32),
             "valid": np.array([[True, True]]), "masks": np.stack([disk, disk])[None]}
  merger = DetectionMerger("hboxes", 2, tile_size=S)
  merger.add(Tile(0, 1, 0, 48), outputs, 0)
  result = merger.result()
  assert len(result["scores"]) == 1 and len(result["polygons"]) == 1
  polygon = result["polygons"][0]
  x, y = polygon[:, 0], polygon[:, 1]
  area = 0.5 * abs(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))
  r = 12 / 28 * 20
  assert math.pi * (r - 1) ** 2 < area < math.pi * r ** 2, area
  np.testing.assert_allclose([x.mean(), y.mean()], [48 + 20, 20], atol=0.75)

  transform = Affine(0.5, 0, 1000.0, 0, -0.5, 2000.0)
  out_lib.write_geojson(str(tmp_path / "m.geojson"), "hboxes", result, ["a", "b"], "EPSG:3857", transform)
  ring = np.asarray(json.load(open(tmp_path / "m.geojson"))["features"][0]["geometry"]["coordinates"][0])
  assert len(ring) == len(polygon) + 1
  lon, lat = _mercator_to_lonlat(0.5 * x + 1000.0, -0.5 * y + 2000.0)
  assert np.abs(ring[:-1, None] - np.stack([lon, lat], -1)[None]).max(-1).min(1).max() < 1e-9
  out_lib.write_geopackage(str(tmp_path / "m.gpkg"), "hboxes", result, ["a", "b"], rasterio.crs.CRS.from_epsg(3857), transform)
  import pyogrio
  import shapely
  geometry = pyogrio.raw.read(tmp_path / "m.gpkg", layer="b")[2]
  np.testing.assert_allclose(np.asarray(shapely.from_wkb(geometry[0]).exterior.coords)[:-1],
                             np.stack([0.5 * x + 1000.0, -0.5 * y + 2000.0], -1))


def _mercator_to_lonlat(x, y):
  """EPSG:3857 -> EPSG:4326 in closed form (spherical Web Mercator, R = 6378137 m)."""
  r = 6378137.0
  return np.degrees(x / r), np.degrees(2 * np.arctan(np.exp(y / r)) - math.pi / 2)


def test_geotiff_in_gives_cog_geojson_and_geopackage_in_the_scenes_crs(seg_rd, tmp_path):
  """A 3-band GeoTIFF in EPSG:3857, 0.6 m pixels: the class map is a Cloud-Optimised GeoTIFF with
  the input's CRS and transform and the PNG's pixels; each GeoJSON polygon is the transform of
  its DOTA corners reprojected to (lon, lat) by the closed-form Web Mercator inverse; the
  GeoPackage holds one layer per class with the same polygons in EPSG:3857."""
  from rasterio.transform import Affine
  pixels = (np.random.default_rng(3).random((3, 100, 130)) * 255).astype(np.uint8)
  transform = Affine(0.6, 0.0, 1_250_000.0, 0.0, -0.6, 6_100_000.0)
  path = tmp_path / "geo.tif"
  with rasterio.open(path, "w", driver="GTiff", height=100, width=130, count=3, dtype="uint8",
                     crs="EPSG:3857", transform=transform) as ds:
    ds.write(pixels)
  out = tmp_path / "out"
  summary = predict_scene(seg_rd, str(path), str(out), progress=False)
  assert summary["crs"] == "EPSG:3857"
  with rasterio.open(out / "geo_ss.tif") as cog:
    assert cog.crs.to_epsg() == 3857 and cog.transform == transform and (cog.width, cog.height) == (130, 100)
    assert cog.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    assert json.loads(cog.tags()["class_names"]) == seg_rd.class_names("ss")
    np.testing.assert_array_equal(cog.read(1), np.asarray(Image.open(out / "geo_ss.png")))

  from mtp_jax.metrics.submissions import read_dota_task1
  names = seg_rd.class_names("rd")
  per_class = read_dota_task1(str(out / "geo_rd_dota"), names)["geo"]
  dota = sorted(((names[c], round(float(d[0]), 6), d[1:].reshape(4, 2)) for c, ds in enumerate(per_class) for d in ds),
                key=lambda t: t[:2])
  features = json.load(open(out / "geo_rd.geojson"))["features"]
  assert len(features) == len(dota) == summary["tasks"]["rd"]["detections"] > 0
  geo = sorted(((f["properties"]["class"], round(f["properties"]["score"], 6), np.asarray(f["geometry"]["coordinates"][0]))
                for f in features), key=lambda t: t[:2])
  for (c1, s1, corners), (c2, s2, ring) in zip(dota, geo):
    assert c1 == c2 and abs(s1 - s2) < 2e-6
    x = 0.6 * corners[:, 0] + 1_250_000.0
    y = -0.6 * corners[:, 1] + 6_100_000.0
    lonlat = np.stack(_mercator_to_lonlat(x, y), -1)
    assert len(ring) == 5 and np.array_equal(ring[0], ring[-1])   # closed
    area = 0.5 * np.sum(ring[:-1, 0] * ring[1:, 1] - ring[1:, 0] * ring[:-1, 1])
    assert area > 0                                             # counter-clockwise (RFC 7946)
    # The same four corners (DOTA's precision: 0.01 px = 0.006 m ~ 5e-8 degrees).
    d = np.abs(ring[:-1, None, :] - lonlat[None]).max(-1)
    assert d.min(axis=1).max() < 1e-7, d

  import pyogrio
  import shapely
  layers = dict(pyogrio.list_layers(out / "geo_rd.gpkg"))
  assert sorted(layers) == sorted(names)
  tables = {r[0] for r in sqlite3.connect(out / "geo_rd.gpkg").execute("select table_name from gpkg_contents")}
  assert tables == set(names)
  total = 0
  for c, name in enumerate(names):
    meta, _, geometry, fields = pyogrio.raw.read(out / "geo_rd.gpkg", layer=name)
    assert "3857" in meta["crs"] and list(meta["fields"]) == ["class", "score"]
    total += len(geometry)
    assert len(geometry) == summary["tasks"]["rd"]["per_class"][name]
    for wkb, score in zip(geometry, fields[1]):
      polygon = np.asarray(shapely.from_wkb(wkb).exterior.coords)[:-1]
      # The DOTA line of this class and score whose corners, mapped, are the polygon's (0.006 m
      # is DOTA's 0.01 px); several lines may share a score.
      mapped = [np.stack([0.6 * k[:, 0] + 1_250_000.0, -0.6 * k[:, 1] + 6_100_000.0], -1)
                for c1, s1, k in dota if c1 == name and abs(s1 - score) < 2e-6]
      assert min(np.abs(polygon - m).max() for m in mapped) < 0.01
  assert total == len(features)


def test_bad_inputs_give_one_clear_error_and_leave_nothing(seg_rd, tmp_path, monkeypatch):
  out = tmp_path / "out"
  random_scene(tmp_path / "grey.png", 80, 80, bands=1)
  random_scene(tmp_path / "tiny.png", 20, 80)
  random_scene(tmp_path / "plain.png", 80, 80)
  (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
  cases = [("grey.png", {}, "1 band"), ("tiny.png", {}, "at least 32 px"),
           ("plain.png", {"formats": ("geojson",)}, "not georeferenced"),
           ("broken.png", {}, "broken.png"), ("plain.png", {"formats": ("kml",)}, "choose among"),
           ("plain.png", {"path2": str(tmp_path / "plain.png")}, "only change detection"),
           ("plain.png", {"window": 128}, "64-px tiles")]
  for name, kwargs, message in cases:
    with pytest.raises(DataError, match=message):
      predict_scene(seg_rd, str(tmp_path / name), str(out), progress=False, **kwargs)
    assert not os.path.exists(out) or os.listdir(out) == [], (name, os.listdir(out))
  # Without the geo extra: plain images still work (PIL), geo formats name the extra.
  monkeypatch.setattr(pipeline, "have_rasterio", lambda: False)
  with pytest.raises(DataError, match=r"pip install -e '\.\[geo\]'"):
    predict_scene(seg_rd, str(tmp_path / "plain.png"), str(out), formats=("geotiff",), progress=False)
  summary = predict_scene(seg_rd, str(tmp_path / "plain.png"), str(out), formats=("png", "json"),
                          progress=False, use_rasterio=False)
  assert sorted(os.listdir(out)) == ["plain.json", "plain_ss.png"] and summary["crs"] is None


def test_cli_predicts_a_folder_and_exits_2_on_bad_input(mtp_run, tmp_path, capsys):
  folder = tmp_path / "images"
  folder.mkdir()
  random_scene(folder / "a.png", 70, 90, seed=1)
  random_scene(folder / "b.jpg", 64, 64, seed=2)
  predict_main(["--workdir", mtp_run[0], "--input", str(folder), "--out", str(tmp_path / "out"),
                "--tasks", "ss,rd", "--subset", "sior", "--quiet"])
  printed = capsys.readouterr().out
  assert "a.png: 90 x 70 px, 4 tiles" in printed and "b.jpg: 64 x 64 px, 1 tiles" in printed
  files = sorted(os.listdir(tmp_path / "out"))
  assert files == ["a.json", "a_preview.png", "a_rd_dota", "a_ss.png", "b.json", "b_preview.png", "b_rd_dota", "b_ss.png"]
  summary = json.load(open(tmp_path / "out" / "a.json"))
  assert summary["subset"] == "sior" and summary["tasks"]["ss"]["classes"][0] == "background"
  assert len(summary["tasks"]["ss"]["classes"]) == 1 + 20 and sum(summary["tasks"]["ss"]["pixels_per_class"].values()) == 70 * 90
  with pytest.raises(SystemExit) as exit_info:
    predict_main(["--workdir", mtp_run[0], "--input", str(tmp_path / "missing.tif"), "--out", str(tmp_path / "o2")])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "missing.tif" in err and len(err.strip().splitlines()) == 1
