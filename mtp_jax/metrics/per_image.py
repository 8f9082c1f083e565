"""Host-side evaluators that need the whole dataset at once (detection AP): per-image storage.

Each process adds the images it evaluated (keyed by a dataset-wide image id); `gather()` gives
every process all images; scoring walks the ids in sorted order, so the numbers do not depend on
how the images were split over processes or batches.
"""

from mtp_jax.parallel import distributed


class PerImageEvaluator:
  """add(image_id, *values); state()/merge(states) to combine evaluators; gather() over processes."""

  def __init__(self):
    self.images = {}

  def add(self, image_id, *values):
    if image_id in self.images:
      raise ValueError(f"{type(self).__name__}: image {image_id!r} added twice")
    self.images[image_id] = values

  def state(self) -> dict:
    """Picklable {image_id: values}."""
    return dict(self.images)

  def merge(self, states):
    for state in states:
      for image_id, values in state.items():
        if image_id in self.images:
          raise ValueError(f"{type(self).__name__}: image {image_id!r} evaluated twice "
                           "(by two processes, or twice in the data)")
        self.images[image_id] = values

  def gather(self):
    """Every process's images on every process (a collective: all processes must call it)."""
    states = distributed.allgather_pickle(self.state())
    self.images = {}
    self.merge(states)
    return self

  def columns(self) -> list:
    """[list of values 0 over sorted image ids, list of values 1, ...]."""
    ids = sorted(self.images)
    return [list(column) for column in zip(*(self.images[i] for i in ids))] if ids else []
