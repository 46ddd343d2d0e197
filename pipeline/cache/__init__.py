"""The activation cache: manifest and content key, per-token normalization, the zarr and memmap
backends, the shard writer, the reader and its shuffled stream, the catalog and context windows."""
