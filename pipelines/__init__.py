"""Beam wiring, sources and sinks, and the `mmcorpus` command line."""
