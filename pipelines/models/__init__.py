"""Model runners used by the pipelines: open_clip scoring and embeddings, BLIP captioning and ITM."""
