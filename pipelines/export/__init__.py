"""`mmcorpus export`: a finished pairs or interleaved output as WebDataset tars or a Hugging Face dataset folder."""
