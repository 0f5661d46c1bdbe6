"""rbees-pool: the model catalog, downloads and worker lifecycle on one host."""
