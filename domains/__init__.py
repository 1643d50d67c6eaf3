"""Domain modules: how each kind of data becomes fields, paths, networks, features and metrics."""
