"""Dataset converters, input pipelines and the synthetic SAMRS sample for mtp_jax."""
