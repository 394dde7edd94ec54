"""The `mmcorpus train` command; the loader, model, loop and report are mmcorpus.trainer."""
