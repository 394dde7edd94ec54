"""One pipeline: alt texts, caption datasets and interleaved documents -> scored, deduplicated image-text pairs."""
