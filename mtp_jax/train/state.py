"""The train state: one pytree holding everything a step reads and writes."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # () int32, steps done
  nonfinite_steps: jax.Array  # () int32, steps skipped because the loss or a gradient was not finite
  params: Any              # nnx.State of nnx.Param
  batch_stats: Any         # nnx.State of nnx.BatchStat
  opt_state: Any           # optax state over `params`


def create_state(build_model, tx, seed: int) -> TrainState:
  """Builds the model from `seed` and returns its fresh TrainState (run under jit to shard it)."""
  model = build_model(nnx.Rngs(seed))
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return TrainState(step=jnp.zeros((), jnp.int32), nonfinite_steps=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params))
