"""mtp_jax: multi-task pretraining of remote-sensing foundation models in JAX/Flax.

Importing this package is cheap: it pulls in neither tensorflow nor torch.
"""

__version__ = "0.1.0"
