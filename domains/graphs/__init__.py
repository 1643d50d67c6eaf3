"""Graphs: a graph-generation domain on torch-geometric (SPECTRE / DiGress benchmarks)."""
