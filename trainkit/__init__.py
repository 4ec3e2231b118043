"""Training infrastructure shared by jaxsparse and jaxldm: data root, mesh, checkpoints, metrics."""
