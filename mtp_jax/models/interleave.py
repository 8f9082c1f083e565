"""The batch layout of multi-subset steps: subsets interleaved row by row.

The G subsets' images form one batch laid out (b, G) -> b*G, image i of subset g at row
i*G + g (MTP_SPEC §3.2: one encoder pass over every subset's images). A batch split over
devices then gives each device whole (i, :) rows, so taking one subset's rows is a local reshape
on every device, never a collective.
"""

import jax


def split_rows(x, groups: int):
  """(b*G, ...) rows interleaved by subset -> (b, G, ...); [:, g] is subset g."""
  if x.shape[0] % groups:
    raise ValueError(f"batch of {x.shape[0]} rows does not split into {groups} subsets")
  return x.reshape(x.shape[0] // groups, groups, *x.shape[1:])


def subset_rows(x, groups: int) -> list:
  """(b*G, ...) interleaved rows -> [subset 0's (b, ...), ..., subset G-1's]."""
  rows = split_rows(x, groups)
  return [rows[:, g] for g in range(groups)]


def rows_of(tree, groups: int, g: int):
  """Subset g's (b, ...) rows of every (b*G, ...) leaf of a pytree of interleaved arrays."""
  return jax.tree.map(lambda x: split_rows(x, groups)[:, g], tree)
