"""Training throughput of the CPU-scale EGRU, GRU and LSTM language models, against the machine's matmul peak.

  python benchmarks/lm_throughput.py [--batch_size=32 --bptt=35 --steps=30]

Prints, per model: training tokens/s, matmul FLOPs per token (6 x MACs: forward, and backward to inputs and
weights), achieved GFLOP/s and its share of the measured fp32 matmul peak. Where PyTorch is installed it also
times `torch.nn.GRU` / `nn.LSTM` language models of the same shape in the same run.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxsparse.configs.common import get_lm_config
from jaxsparse.train import Trainer
from trainkit import mesh as mesh_lib

_BATCH = flags.DEFINE_integer("batch_size", 32, "Sequences per step.")
_BPTT = flags.DEFINE_integer("bptt", 35, "Window length.")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps per model (after warm-up).")
_VOCAB = flags.DEFINE_integer("vocab_size", 10_000, "Vocabulary (PTB: 10,000).")
_CELLS = flags.DEFINE_list("cells", ["egru", "gru", "lstm"], "Cells to time.")
_TORCH = flags.DEFINE_bool("torch", True, "Also time PyTorch models of the same shape where torch is installed.")

GATES = {"egru": 3, "gru": 3, "lstm": 4}


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
  """Measured fp32 GFLOP/s of a large square matmul: the machine's practical peak."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  matmul = jax.jit(jnp.dot)
  matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    tic = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - tic)
  return 2 * n**3 / best / 1e9


def macs_per_token(cell: str, embedding_size: int, hidden_sizes: tuple[int, ...], vocab_size: int) -> int:
  """Dense multiply-accumulates per token: input and recurrent matrices of every layer, and the decoder."""
  sizes = [embedding_size, *hidden_sizes]
  recurrent = sum(GATES[cell] * h * (i + h) for i, h in zip(sizes[:-1], sizes[1:]))
  return recurrent + hidden_sizes[-1] * vocab_size


def time_jax(cell: str) -> tuple[float, int]:
  config = get_lm_config(cell, "ptb", "cpu")
  config.data.batch_size = _BATCH.value
  config.data.bptt = _BPTT.value
  mesh = mesh_lib.make_data_mesh()
  trainer = Trainer(config, _VOCAB.value, mesh)
  state = trainer.init_state()
  rng = np.random.default_rng(0)
  batches = [mesh_lib.put_batch(tuple(rng.integers(0, _VOCAB.value, (2, _BATCH.value, _BPTT.value),
                                                   dtype=np.int32)), mesh) for _ in range(4)]
  lr = jnp.float32(config.optim.learning_rate)
  for batch in batches[:2]:
    state, metrics = trainer.train_step(state, batch[0], batch[1], lr)
  jax.block_until_ready(metrics)
  tic = time.perf_counter()
  for i in range(_STEPS.value):
    batch = batches[i % len(batches)]
    state, metrics = trainer.train_step(state, batch[0], batch[1], lr)
  jax.block_until_ready(metrics)
  elapsed = time.perf_counter() - tic
  tokens = _STEPS.value * _BATCH.value * _BPTT.value
  macs = macs_per_token(cell, config.model.embedding_size, tuple(config.model.hidden_sizes), _VOCAB.value)
  return tokens / elapsed, macs


def time_torch(cell: str) -> float | None:
  """Tokens/s of a PyTorch LM of the same shape (stacked nn.GRU/nn.LSTM layers, tied decoder, Adam)."""
  try:
    import torch
  except ImportError:
    return None
  config = get_lm_config(cell, "ptb", "cpu")
  sizes = [config.model.embedding_size, *config.model.hidden_sizes]
  rnn_type = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cell]

  class TorchLM(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.embedding = torch.nn.Embedding(_VOCAB.value, sizes[0])
      self.layers = torch.nn.ModuleList([rnn_type(i, h) for i, h in zip(sizes[:-1], sizes[1:])])
      self.bias = torch.nn.Parameter(torch.zeros(_VOCAB.value))

    def forward(self, tokens):
      hidden = self.embedding(tokens)
      for layer in self.layers:
        hidden, _ = layer(hidden)
      return hidden @ self.embedding.weight.T + self.bias

  torch.manual_seed(0)
  model = TorchLM()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.0, 0.999), weight_decay=0.1)
  tokens = torch.randint(0, _VOCAB.value, (_BPTT.value + 1, _BATCH.value))

  def step():
    optimizer.zero_grad()
    logits = model(tokens[:-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, _VOCAB.value), tokens[1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    optimizer.step()

  for _ in range(2):
    step()
  tic = time.perf_counter()
  for _ in range(_STEPS.value):
    step()
  return _STEPS.value * _BATCH.value * _BPTT.value / (time.perf_counter() - tic)


def main(argv):
  del argv
  peak = matmul_peak_gflops()
  print(f"devices: {jax.devices()}  measured fp32 matmul peak: {peak:.0f} GFLOP/s")
  print(f"batch {_BATCH.value}, BPTT {_BPTT.value}, vocabulary {_VOCAB.value}, CPU-scale models (emb 256, 512-512-256)")
  print(f"| model | framework | tokens/s | matmul MFLOP/token | GFLOP/s | share of peak |")
  print(f"|---|---|---:|---:|---:|---:|")
  for cell in _CELLS.value:
    rate, macs = time_jax(cell)
    flops = 6 * macs
    print(f"| {cell.upper()} | JAX | {rate:,.0f} | {flops / 1e6:.1f} | {rate * flops / 1e9:.0f} | "
          f"{rate * flops / 1e9 / peak:.0%} |", flush=True)
    if _TORCH.value and cell in ("gru", "lstm"):
      torch_rate = time_torch(cell)
      if torch_rate is not None:
        print(f"| {cell.upper()} | PyTorch | {torch_rate:,.0f} | {flops / 1e6:.1f} | {torch_rate * flops / 1e9:.0f} | "
              f"{torch_rate * flops / 1e9 / peak:.0%} |", flush=True)


if __name__ == "__main__":
  app.run(main)
