"""PyTorch twin of the MTP encoder (needs the `torch` extra; `import mtp_jax` never imports it)."""
