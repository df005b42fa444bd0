"""Offline jobs over a whole corpus: ingesting documents into a chunk index."""
