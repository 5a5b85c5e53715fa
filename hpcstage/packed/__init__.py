"""Packed datasets (docs/packed-datasets.md): many small files stored as a few large plain-tar
segments plus a Parquet manifest, read here, written by ``hpcstage pack``."""
