"""Real models and real inputs used to exercise onnxq end to end (fetched on demand, cached)."""
