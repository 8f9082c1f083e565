"""SAMRS (SOTA, SIOR, FAST): release layout, synthetic sample, TFRecord schema, converter and
static example (examples.py: the parser the records reader takes)."""
