"""The diffusion core: time convention, probability paths, solvers, and training of one expert."""
