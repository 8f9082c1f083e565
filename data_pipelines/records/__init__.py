"""The records layer: sharded TFRecord files and the one grain reader every dataset uses.

A converted split lives in `<dir>/<subset>/<split>/`: shards `<subset>-<split>.tfrecord-0000i-of-
0000K` and `dataset_info.json` listing them (with record counts and checksums). This package owns
that layout (shards.py), writing it (writer.py), the image bytes inside a record (images.py),
reading it with grain (reader.py: one subset's batches; batches.py: the training streams of every
subset zipped, with checkpointable state) and the accounting of corrupt records (corrupt.py).
It knows no dataset: a source (data_pipelines/samrs/, data_pipelines/downstream/) gives the
record schema and the parser that turns one record into a static example.
"""
