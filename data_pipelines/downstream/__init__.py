"""Finetuning datasets (MTP_SPEC §5): native-release readers, one TFRecord schema, input pipelines.

    python -m data_pipelines.convert eurosat --root RAW --out DIR

writes `<DIR>/<dataset>/<split>/` shards and a `dataset_info.json`, the folder layout of
data_pipelines/records/ (the SAMRS conversion's too), so the same grain reader
(data_pipelines/records/reader.py `make_dataset`) reads them with this package's parsers.
"""
