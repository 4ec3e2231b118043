"""Latent diffusion for one-shot drawing (a JAX reimplementation of serre-lab/LatentMatters)."""
