"""Task decoders: one file per head."""
