"""Throughput of the jaxldm training steps and samplers at batch 128 with the reference shapes, against the
reference PyTorch implementation measured on a 2-core CPU.

  python benchmarks/ldm_throughput.py [--repeats=5] [--skip_pixel] [--slow_call_s=10]

Rows: autoencoder step (48x48, latent 128; plain, +Barlow, +Barlow+prototype), latent denoiser step on
precomputed latents (MLP U-Net dim 64, mults (1, 2)), guided latent sampling (DDPM over 1000 steps and DDIM over
50, both with the conditional and null passes in one batched call), and the pixel-space guided model's step
(48 features, mults (1, 2, 4), T = 500). Each row compiles once; FLOPs per image come from XLA's cost analysis
of that executable. A row whose first call takes `--slow_call_s` or more (the pixel step on CPU) is timed by that
one call, which keeps the whole table within a few minutes. The goal is 1.5x the reference.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import app, flags
from flax import nnx

from jaxldm import diffusion, latent_losses
from jaxldm.denoisers import LatentUNet, PixelUNet
from jaxldm.train_diffusion import make_sampler, make_train_step

BATCH = 128
LATENT = 128
SIZE = 48
# Reference PyTorch images/s on the same kind of 2-core CPU (the measurements).
REFERENCE = {
    "autoencoder step (none)": 702.0,
    "autoencoder step (barlow)": 604.0,
    "autoencoder step (barlow+prototype)": 572.0,
    "latent denoiser step": 5585.0,
    "latent sampling DDPM 1000 steps, guided": 11.8,
    "latent sampling DDIM 50 steps, guided": None,
    "pixel guided model step": 7.8,
}

_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per row after the first (see --slow_call_s).")
_SKIP_PIXEL = flags.DEFINE_bool("skip_pixel", False, "Skip the (slow) pixel-space model row.")
_SLOW_CALL_S = flags.DEFINE_float("slow_call_s", 10.0, "A row whose first (compiled) call takes this many seconds "
                                  "or more is measured by that call alone.")


def rngs(seed: int = 0) -> nnx.Rngs:
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def compile_with_flops(jitted, *args):
  """(compiled executable, FLOPs per image from XLA's cost analysis): each row compiles once."""
  compiled = jitted.lower(*args).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return compiled, float(analysis.get("flops", float("nan"))) / BATCH


def time_calls(call, repeats: int) -> float:
  """Seconds per call of `call()` (which returns something to block on). The first call runs already compiled
  code; when it takes `--slow_call_s` or more it is the measurement, else `repeats` more calls are timed."""
  tic = time.perf_counter()
  out = jax.block_until_ready(call())
  first = time.perf_counter() - tic
  if first >= _SLOW_CALL_S.value:
    return first
  tic = time.perf_counter()
  for _ in range(repeats):
    out = call()
  jax.block_until_ready(out)
  return (time.perf_counter() - tic) / repeats


def bench_step(state, step, batch, repeats: int) -> tuple[float, float]:
  """(images/s, FLOPs/image) of a donating train step."""
  compiled, flops = compile_with_flops(step, state, batch, jax.random.key(0))
  holder = {"state": state, "i": 0}

  def call():
    holder["i"] += 1
    holder["state"], metrics = compiled(holder["state"], batch, jax.random.key(holder["i"]))
    return metrics

  return BATCH / time_calls(call, repeats), flops


def autoencoder_rows(repeats: int) -> dict[str, tuple[float, float]]:
  key = jax.random.key(1)
  images = (jax.random.uniform(key, (2, BATCH, SIZE, SIZE, 1)) > 0.8).astype(jnp.float32)
  batch = {"exemplar": images[0], "variation": images[1], "label": jnp.arange(BATCH, dtype=jnp.int32) % 100}
  rows = {}
  for name, spec in (("none", "none"), ("barlow", "barlow:30"), ("barlow+prototype", "barlow:30,prototype:1")):
    autoencoder, losses = latent_losses.build_autoencoder_and_losses(spec, LATENT, 100, rngs())
    state, step = latent_losses.make_train_step(autoencoder, losses, latent_losses.make_optimizer())
    rows[f"autoencoder step ({name})"] = bench_step(state, step, batch, repeats)
  return rows


def diffusion_optimizer() -> optax.GradientTransformation:
  return optax.adamw(1e-4, eps=1e-5)


def latent_rows(repeats: int) -> dict[str, tuple[float, float]]:
  denoiser = LatentUNet(LATENT, dim=64, dim_mults=(1, 2), rngs=rngs())
  schedule = diffusion.make_schedule("scaled_linear", 1000)
  params = jax.tree.map(jnp.copy, nnx.state(denoiser, nnx.Param))  # the train step donates the module's arrays
  state, step = make_train_step(denoiser, diffusion_optimizer(), schedule, 0.1)
  latents = jax.random.normal(jax.random.key(2), (2, BATCH, LATENT))
  rows = {"latent denoiser step": bench_step(state, step, {"x0": latents[0], "cond": latents[1]}, repeats)}
  for name, sampler_name, steps in (("DDPM 1000", "ddpm", 1000), ("DDIM 50", "ddim", 50)):
    sample = ml_collections.ConfigDict(dict(sampler=sampler_name, ddim_steps=steps, ddim_eta=0.0, guidance=1.0,
                                            variance="posterior"))
    sampler, flops = compile_with_flops(make_sampler(nnx.graphdef(denoiser), schedule, sample), params, latents[1],
                                        jax.random.key(3))
    seconds = time_calls(lambda: sampler(params, latents[1], jax.random.key(3)), max(1, repeats // 2))
    rows[f"latent sampling {name} steps, guided"] = (BATCH / seconds, flops)
  return rows


def pixel_rows(repeats: int) -> dict[str, tuple[float, float]]:
  denoiser = PixelUNet(features=48, dim_mults=(1, 2, 4), rngs=rngs())
  schedule = diffusion.make_schedule("linear", 500)
  state, step = make_train_step(denoiser, diffusion_optimizer(), schedule, 0.1)
  images = jax.random.uniform(jax.random.key(4), (2, BATCH, SIZE, SIZE, 1)) * 2 - 1
  return {"pixel guided model step": bench_step(state, step, {"x0": images[0], "cond": images[1]},
                                                max(1, repeats // 2))}


def print_rows(rows: dict[str, tuple[float, float]]) -> None:
  for name, (rate, flops) in rows.items():
    reference = REFERENCE[name]
    ratio = f"{rate / reference:7.2f}" if reference else f"{'-':>7s}"
    ref_text = f"{reference:10.1f}" if reference else f"{'-':>10s}"
    print(f"{name:44s} {rate:10.1f} {1000 / rate:10.3f} {ref_text} {ratio} {flops / 1e9:12.4f}", flush=True)


def main(argv):
  del argv
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {jax.device_count()} device(s), batch {BATCH}")
  print(f"{'row':44s} {'images/s':>10s} {'ms/image':>10s} {'reference':>10s} {'ratio':>7s} {'GFLOP/image':>12s}",
        flush=True)
  print_rows(latent_rows(_REPEATS.value))
  print_rows(autoencoder_rows(_REPEATS.value))
  if not _SKIP_PIXEL.value:
    print_rows(pixel_rows(_REPEATS.value))
  print("goal: ratio >= 1.5 (1.5x the reference PyTorch implementation)")


if __name__ == "__main__":
  app.run(main)
