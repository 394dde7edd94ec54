"""Mixture loader, compact Flamingo model, training loop and data-validation report. Reads Parquet only;
never imports `mmcorpus.pipelines`."""
