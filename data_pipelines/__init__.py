"""Datasets for mtp_jax: the records layer (records/: TFRecord shards, writer, grain reader), one
source per dataset (samrs/: pretraining; downstream/: finetuning releases) with its schema,
converter and parser, the shared sample augmentations (augment.py) and instance packing
(instances.py), and the experiments' data sources (sources.py)."""
