"""Rotated-detection submission files of the online benchmarks, written and read back.

DOTA Task1 (the DOTA evaluation server): one `Task1_<class>.txt` per class, one line per
detection `<image id> <score> x1 y1 x2 y2 x3 y3 x4 y4` (corners of the le90 box in image pixels,
2 decimals; ours: scores with 6 decimals where mmrotate rounds to 2, since ties reorder the
server's ranking), by descending score within each image, images in sorted order; zipped as
`Task1.zip` (the files at the archive's top level), the file the server takes.
FAIR1M-2.0 (the ISPRS / Gaofen benchmark): one `<image id>.xml` per image in the release's own
annotation schema (`<source><filename><id>.tif`, `<objects><object><coordinate>pixel`,
`<type>rectangle`, `<possibleresult><name>` + `<probability>`, `<points>` of the 4 corners and
the first again), zipped as `test.zip`.
`images`: {image id: [(N_c, 6) [cx, cy, w, h, angle, score] per class]}.
"""

import os
import xml.etree.ElementTree as ET
import zipfile

import numpy as np

from mtp_jax.ops.boxes import rbox_to_poly


def _by_score(dets):
  dets = np.asarray(dets, np.float64).reshape(-1, 6)
  return dets[np.argsort(-dets[:, 5], kind="stable")]


def _zip(path: str, files):
  """The files at the archive's top level, with a fixed timestamp: the same detections give the
  same bytes, whichever run or process wrote them."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    for f in files:
      info = zipfile.ZipInfo(os.path.basename(f), date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      with open(f, "rb") as src:
        z.writestr(info, src.read())
  return path


def write_dota_task1(folder: str, images: dict, class_names) -> str:
  """The Task1 files and Task1.zip under `folder`; returns the zip's path."""
  os.makedirs(folder, exist_ok=True)
  files = []
  for c, name in enumerate(class_names):
    lines = []
    for image_id in sorted(images):
      for d in _by_score(images[image_id][c]):
        corners = rbox_to_poly(d[:5]).reshape(-1)
        lines.append(f"{image_id} {d[5]:.6f} " + " ".join(f"{v:.2f}" for v in corners))
    files.append(os.path.join(folder, f"Task1_{name}.txt"))
    with open(files[-1], "w") as f:
      f.write("".join(line + "\n" for line in lines))
  return _zip(os.path.join(folder, "Task1.zip"), files)


def read_dota_task1(folder: str, class_names) -> dict:
  """Task1 files (from Task1.zip when present) -> {image id: [(N_c, 9) [score, x1, y1, ..., y4]
  per class]}; ValueError naming the file and line of a malformed one."""
  out = {}
  zipped = os.path.join(folder, "Task1.zip")
  archive = zipfile.ZipFile(zipped) if os.path.isfile(zipped) else None
  try:
    for c, name in enumerate(class_names):
      file = f"Task1_{name}.txt"
      if archive:
        text = archive.read(file).decode()
      else:
        with open(os.path.join(folder, file)) as f:
          text = f.read()
      for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if len(parts) != 10:
          raise ValueError(f"{file} line {n}: expected an image id, a score and 8 coordinates")
        per_class = out.setdefault(parts[0], [np.zeros((0, 9)) for _ in class_names])
        per_class[c] = np.concatenate([per_class[c], np.asarray([parts[1:]], np.float64)])
  finally:
    if archive:
      archive.close()
  return out


def write_fair1m_xml(folder: str, images: dict, class_names, image_suffix: str = ".tif") -> str:
  """One XML per image and their test.zip under `folder`; returns the zip's path."""
  os.makedirs(folder, exist_ok=True)
  files = []
  for image_id in sorted(images):
    root = ET.Element("annotation")
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "filename").text = image_id + image_suffix
    ET.SubElement(source, "origin").text = "GF2/GF3"
    research = ET.SubElement(root, "research")
    for key, value in (("version", "2.0"), ("provider", "mtp_jax"), ("author", "mtp_jax"),
                       ("pluginname", "FAIR1M"), ("pluginclass", "object detection"), ("time", "")):
      ET.SubElement(research, key).text = value
    objects = ET.SubElement(root, "objects")
    for c, name in enumerate(class_names):
      for d in _by_score(images[image_id][c]):
        obj = ET.SubElement(objects, "object")
        ET.SubElement(obj, "coordinate").text = "pixel"
        ET.SubElement(obj, "type").text = "rectangle"
        ET.SubElement(obj, "description").text = "None"
        result = ET.SubElement(obj, "possibleresult")
        ET.SubElement(result, "name").text = name
        ET.SubElement(result, "probability").text = f"{d[5]:.6f}"
        points = ET.SubElement(obj, "points")
        corners = rbox_to_poly(d[:5])
        for x, y in [*corners, corners[0]]:
          ET.SubElement(points, "point").text = f"{x:.6f},{y:.6f}"
    ET.indent(root)
    files.append(os.path.join(folder, image_id + ".xml"))
    ET.ElementTree(root).write(files[-1], encoding="utf-8", xml_declaration=True)
  return _zip(os.path.join(folder, "test.zip"), files)


def read_fair1m_xml(path: str, class_names) -> list:
  """One submission XML -> [(N_c, 9) [score, x1, y1, ..., y4] per class]."""
  index = {n: c for c, n in enumerate(class_names)}
  out = [[] for _ in class_names]
  for obj in ET.parse(path).getroot().iter("object"):
    name = obj.findtext("possibleresult/name")
    if name not in index:
      raise ValueError(f"{path}: class {name!r} is not one of the {len(class_names)} classes")
    points = [[float(v) for v in p.text.split(",")] for p in obj.iter("point")][:4]
    out[index[name]].append([float(obj.findtext("possibleresult/probability")), *np.reshape(points, -1)])
  return [np.asarray(rows, np.float64).reshape(-1, 9) for rows in out]
