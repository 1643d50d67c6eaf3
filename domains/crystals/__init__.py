"""Crystal structures: periodic materials as fractional coordinates, a lattice and atom types."""
