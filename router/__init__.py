"""The router p(k | x_t, t), its training, partitioning, and the ensemble of experts."""
