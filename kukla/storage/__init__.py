"""The Zarr activation store: writer, global shuffle, reader and streaming batches."""
