"""Images -> image sets: decoding, parquet sets, sources, protocols, generated sets."""
