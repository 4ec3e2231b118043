"""Word-level language model: embedding -> stacked recurrent layers -> decoder tied to the embedding.

Regularised as in AWD-LSTM and the EGRU language models: word dropout (whole embedding rows), locked
(variational) dropout on the embeddings, between layers and on the output, and DropConnect on every `R`.
Every dropout mask is drawn once per call (one BPTT window) from the explicit `key`, and only when `train`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse import cells, rnn

LMCarry = tuple[cells.Carry, ...]


class LanguageModel(nnx.Module):
  """Embedding (vocab_size, embedding_size), recurrent layers `hidden_sizes`, tied decoder with output bias.

  The last layer's size must equal `embedding_size` so its outputs decode through the embedding matrix.
  Between windows the EGRU carries its event output `y`; its internal state `c` restarts from zero every
  call, as in the reference, unless `carry_internal_state`. GRU and LSTM carry their whole state.
  """

  def __init__(self, vocab_size: int, embedding_size: int, hidden_sizes: Sequence[int], cell: str = "egru", *,
               rngs: nnx.Rngs, word_dropout: float = 0.1, embedding_dropout: float = 0.6,
               between_dropout: float = 0.25, output_dropout: float = 0.5, dropconnect: float = 0.7,
               carry_internal_state: bool = False, gamma: float = 3.6, eps: float = 3.6,
               threshold_mean: float = 0.01, trainable_thresholds: bool = False, weight_init_gain: float = 1.0,
               dtype: jnp.dtype = jnp.float32):
    cells.cell_spec(cell)
    hidden_sizes = tuple(hidden_sizes)
    if not hidden_sizes or hidden_sizes[-1] != embedding_size:
      raise ValueError(f"the last of hidden_sizes={hidden_sizes} must equal embedding_size={embedding_size} "
                       "for the tied decoder")
    if not isinstance(vocab_size, int) or vocab_size <= 0:
      raise ValueError(f"vocab_size={vocab_size!r} must be a positive integer")
    rates = dict(word_dropout=word_dropout, embedding_dropout=embedding_dropout, between_dropout=between_dropout,
                 output_dropout=output_dropout, dropconnect=dropconnect)
    for name, rate in rates.items():
      if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name}={rate!r} must lie in [0, 1)")
    self.cell = cell
    self.vocab_size = vocab_size
    self.embedding_size = embedding_size
    self.hidden_sizes = hidden_sizes
    self.word_dropout = float(word_dropout)
    self.embedding_dropout = float(embedding_dropout)
    self.between_dropout = float(between_dropout)
    self.output_dropout = float(output_dropout)
    self.dropconnect = float(dropconnect)
    self.carry_internal_state = carry_internal_state
    self.embedding = nnx.Param(
        jax.random.uniform(rngs.params(), (vocab_size, embedding_size), dtype, minval=-0.1, maxval=0.1))
    self.output_bias = nnx.Param(jnp.zeros((vocab_size,), dtype))
    self.rnn = rnn.RecurrentStack(cell, embedding_size, hidden_sizes, rngs=rngs, gamma=gamma, eps=eps,
                                  threshold_mean=threshold_mean, trainable_thresholds=trainable_thresholds,
                                  weight_init_gain=weight_init_gain, dtype=dtype)

  def initial_carry(self, batch_size: int) -> LMCarry:
    return self.rnn.initial_carry(batch_size)

  def _window_carry(self, carry: LMCarry) -> LMCarry:
    if self.cell != "egru" or self.carry_internal_state:
      return tuple(carry)
    return tuple(layer_carry._replace(c=jnp.zeros_like(layer_carry.c)) for layer_carry in carry)

  def __call__(self, tokens: jax.Array, carry: LMCarry, key: jax.Array | None = None, train: bool = False,
               return_events: bool = False) -> tuple[jax.Array, LMCarry, dict[str, Any]]:
    """Maps tokens [B, T] to logits [B, T, V], the carry for the next window and an aux dict.

    `train` and `return_events` are Python bools (static under jit); `key` is required when `train`.

    aux: `activity` and `backward_sparsity` per layer [L]; `mean_activity` (pooled over all units);
    `activity_regularizer` (sum over layers of the mean event rate, differentiable through the
    pseudo-derivative); with `return_events`, `events`: each layer's outputs [B, T, H] before dropout.
    """
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens of shape {tokens.shape} and dtype {tokens.dtype} must be integer [batch, time]")
    if len(carry) != len(self.hidden_sizes):
      raise ValueError(f"carry has {len(carry)} layers, the model {len(self.hidden_sizes)}")
    if train and key is None:
      raise ValueError("train=True needs a jax.random key for the dropout masks")
    batch_size = tokens.shape[0]
    embedding = self.embedding[...]
    time_major_tokens = tokens.T
    hidden = jnp.take(embedding, time_major_tokens, axis=0)
    recurrent_masks = between_masks = None
    if train:
      word_key, embedding_key, output_key, between_key, connect_key = jax.random.split(key, 5)
      row_mask = rnn.dropconnect_mask(word_key, (self.vocab_size, 1), self.word_dropout, hidden.dtype)
      hidden = hidden * row_mask[time_major_tokens]
      hidden = hidden * rnn.dropconnect_mask(embedding_key, (1, batch_size, self.embedding_size),
                                             self.embedding_dropout, hidden.dtype)
      between_masks = [
          rnn.dropconnect_mask(layer_key, (1, batch_size, size), self.between_dropout, hidden.dtype)
          for layer_key, size in zip(jax.random.split(between_key, len(self.hidden_sizes)), self.hidden_sizes[:-1])
      ]
      recurrent_masks = [
          layer.dropconnect_mask(layer_key, self.dropconnect)
          for layer_key, layer in zip(jax.random.split(connect_key, len(self.hidden_sizes)), self.rnn.layers)
      ]
    new_carry, layer_outputs, layer_stats = self.rnn(hidden, self._window_carry(carry), recurrent_masks,
                                                     between_masks)
    top = layer_outputs[-1]
    if train:
      top = top * rnn.dropconnect_mask(output_key, (1, batch_size, self.embedding_size), self.output_dropout,
                                       top.dtype)
    logits = jnp.swapaxes(top, 0, 1) @ embedding.T + self.output_bias[...]
    activity = jnp.stack([stats["activity"] for stats in layer_stats])
    sizes = jnp.asarray(self.hidden_sizes, activity.dtype)
    aux: dict[str, Any] = {
        "activity": activity,
        "backward_sparsity": jnp.stack([stats["backward_sparsity"] for stats in layer_stats]),
        "mean_activity": jnp.sum(activity * sizes) / jnp.sum(sizes),
        "activity_regularizer": sum(stats["activity_regularizer"] for stats in layer_stats),
    }
    if return_events:
      aux["events"] = tuple(jnp.swapaxes(outputs, 0, 1) for outputs in layer_outputs)
    return logits, new_carry, aux
