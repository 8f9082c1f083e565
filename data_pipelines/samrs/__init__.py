"""SAMRS (SOTA, SIOR, FAST): release layout, synthetic sample, TFRecord converter and reader."""
