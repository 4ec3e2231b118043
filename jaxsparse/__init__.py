"""Event-based GRU (EGRU) and dense recurrent language models with activity and weight sparsity, in JAX."""
