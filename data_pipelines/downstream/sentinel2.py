"""Sentinel-2 MSI Level-1C bands, in the order the finetuning releases store them.

EuroSAT's 13-band TIFFs and our OSCD conversion keep this order: B01 B02 B03 B04 B05 B06 B07
B08 B8A B09 B10 B11 B12 (indices 0-12), uint16 digital numbers (reflectance x 10,000). RGB is
B04, B03, B02 = indices (3, 2, 1). Ground sampling: 10 m (B02, B03, B04, B08), 20 m (B05-B07,
B8A, B11, B12), 60 m (B01, B09, B10).

L1C_MEAN / L1C_STD: per-band statistics of EuroSAT's 13-band release (torchgeo's values), the
normalisation of every Sentinel-2 L1C config here (the same sensor and processing level).
"""

BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
RGB = (3, 2, 1)   # B04, B03, B02
METRES = {"B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20, "B08": 10,
          "B8A": 20, "B09": 60, "B10": 60, "B11": 20, "B12": 20}

L1C_MEAN = (1354.40546513, 1118.24399958, 1042.92983953, 947.62620298, 1199.47283961,
            1999.79090914, 2369.22292565, 2296.82608323, 732.08340178, 12.11327804,
            1819.01027855, 1118.92391149, 2594.14080798)
L1C_STD = (245.71762908, 333.00778264, 395.09249139, 593.75055589, 566.4170017, 861.18399006,
           1086.63139075, 1117.98170791, 404.91978886, 4.77584468, 1002.58768311, 761.30323499,
           1231.58581042)


def band_stats(bands) -> tuple:
  """(mean, std) tuples of the band indices `bands` (e.g. RGB)."""
  return tuple(L1C_MEAN[b] for b in bands), tuple(L1C_STD[b] for b in bands)
