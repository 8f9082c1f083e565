"""Orbax checkpointing of the train state, the data-iterator state and the run's metadata."""
