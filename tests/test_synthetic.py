"""The synthetic SAMRS sample: deterministic, in the real layout, parseable by the standard tools."""

import filecmp
import os
import pickle
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from data_pipelines.samrs import classes, synthetic

from conftest import SAMPLE_IMAGES, SAMPLE_SIZE


def _all_files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_class_lists_match_the_paper():
  assert [len(classes.SUBSETS[s].classes) for s in ("sota", "sior", "fast")] == [18, 20, 37]
  assert classes.SUBSETS["sota"].classes[4] == "plane"
  assert classes.SUBSETS["fast"].classes[-1] == "Warship"


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
  a, b, c = (str(tmp_path / n) for n in "abc")
  synthetic.generate(a, images=3, size=48, seed=7)
  synthetic.generate(b, images=3, size=48, seed=7)
  synthetic.generate(c, images=3, size=48, seed=8)
  files = _all_files(a)
  assert files == _all_files(b) and len(files) == 3 * 3 * 4 + 3 * 2
  assert all(filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False) for f in files)
  assert not all(filecmp.cmp(os.path.join(a, f), os.path.join(c, f), shallow=False)
                 for f in files if f.endswith(".pkl"))


@pytest.mark.parametrize("name", ["sota", "sior", "fast"])
def test_files_parse_and_agree(sample_dir, name):
  layout = classes.SUBSETS[name]
  base = os.path.join(sample_dir, layout.base)
  train = open(os.path.join(base, "train.txt")).read().split()
  valid = open(os.path.join(base, "valid.txt")).read().split()
  assert len(train) + len(valid) == SAMPLE_IMAGES and not set(train) & set(valid)
  overlaps = 0
  for stem in train + valid:
    image = Image.open(os.path.join(base, layout.images, stem + layout.image_ext))
    assert image.mode == "RGB" and image.size == (SAMPLE_SIZE, SAMPLE_SIZE)
    gray = np.asarray(Image.open(os.path.join(base, layout.segs, "gray", stem + ".png")))
    assert gray.dtype == np.uint8 and gray.shape == (SAMPLE_SIZE, SAMPLE_SIZE)
    with open(os.path.join(base, layout.segs, "ins", stem + ".pkl"), "rb") as f:
      instances = pickle.load(f)
    assert isinstance(instances, list) and instances
    expected_gray = np.full_like(gray, 255)
    coverage = np.zeros(gray.shape, int)
    for inst in instances:
      assert layout.classes[inst["label"]] == inst["category"]
      mask = mask_utils.decode(dict(inst["mask"], counts=inst["mask"]["counts"].encode()))
      assert mask.shape == gray.shape and int(mask.sum()) == inst["size"] > 0
      hbox = inst["rhbox"] if name != "sior" else inst["bbox"]
      ys, xs = np.nonzero(mask)
      # Mask pixel centres lie inside the box, which is tight to within 2 px (a pointed corner of
      # a rotated box may miss the nearest pixel centre by more than one pixel).
      assert hbox[0] <= xs.min() + 0.5 <= hbox[0] + 2 and hbox[2] - 2 <= xs.max() + 0.5 <= hbox[2]
      assert hbox[1] <= ys.min() + 0.5 <= hbox[1] + 2 and hbox[3] - 2 <= ys.max() + 0.5 <= hbox[3]
      expected_gray[mask > 0] = inst["label"]  # later objects overwrite earlier ones
      coverage += mask
    np.testing.assert_array_equal(gray, expected_gray)
    overlaps += int((coverage > 1).any())
    if layout.rotated_source == "pkl":
      lines = open(os.path.join(base, layout.rotated_dir, stem + ".txt")).read().splitlines()
      assert len(lines) == len(instances)
      for line, inst in zip(lines, instances):
        fields = line.split()
        np.testing.assert_allclose(np.float64(fields[:8]).reshape(4, 2), inst["rbox"], atol=1e-9)
        assert fields[8] == inst["category"] and int(fields[9]) == inst["label"]
    else:
      objects = ET.parse(os.path.join(base, layout.rotated_dir, stem + ".xml")).getroot().findall("object")
      assert [o.findtext("name") for o in objects] == [i["category"] for i in instances]
  assert overlaps > 0, "the sample should hold overlapping objects"


def test_bad_arguments_are_refused(tmp_path):
  with pytest.raises(ValueError, match="--size"):
    synthetic.generate(str(tmp_path), images=2, size=8)
