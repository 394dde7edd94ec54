"""What reads a finished output: the dataset card and its plots, `mmcorpus inspect`."""
