"""Multiply-accumulate (MAC) accounting of recurrent language models: dense, exact event-driven, approximate.

An event-driven engine multiplies only nonzero inputs by the nonzero weights of their row, so the exact
count of a product x @ M (M of shape (in, out)) is sum_i [x_i != 0] * nnz(M[i, :]). Per model matrix:
'layer{l}/W' reads the layer input (dense embeddings for layer 0, the previous layer's events above),
'layer{l}/R' reads the layer's previous output y_{t-1} (the carry's output at t = 0), and 'decoder' (the tied
embedding transposed, (D, V)) reads the last layer's events. Biases and elementwise work are not MACs.

Over an evaluation split the exact count is accumulated as integer counts of nonzero tokens per input unit
(`MacTally`, jittable, no overflow for < 2^31 tokens), and reduced on the host in int64:
exact MACs = sum_i count_i * nnz_row_i. The product approximation per matrix is
dense MACs * (1 - weight sparsity) * input activity, which equals the exact count only when activity and
weight sparsity are uncorrelated across units.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import cells
from jaxsparse.pruning import named_leaves

DECODER = "decoder"


def row_nonzeros(weight: jax.Array) -> jax.Array:
  """Nonzero weights in each row of `weight` (in, out): the MACs one nonzero input unit costs."""
  return jnp.sum(weight != 0, axis=1, dtype=jnp.int32)


def exact_macs(inputs: jax.Array, weight: jax.Array) -> jax.Array:
  """Exact event-driven MACs of `inputs @ weight` per token (leading axes of `inputs`), as int32."""
  return jnp.dot((inputs != 0).astype(jnp.int32), row_nonzeros(weight), preferred_element_type=jnp.int32)


def active_counts(inputs: jax.Array) -> jax.Array:
  """Per unit (last axis), the number of tokens (all leading axes) where it is nonzero."""
  return jnp.sum((inputs != 0).reshape(-1, inputs.shape[-1]), axis=0, dtype=jnp.int32)


def layer_matrix_names(num_layers: int) -> list[str]:
  return [f"layer{l}/{m}" for l in range(num_layers) for m in ("W", "R")] + [DECODER]


def lm_matrices(params: Any, embedding_pattern: str = r"(^|/)embedding$") -> dict[str, jax.Array]:
  """The MAC-relevant matrices of a language model's parameters, as (in, out) arrays under canonical names.

  Recurrent layers are the leaves whose path ends in 'W' / 'R', in pytree order; the decoder is the
  transpose of the one 2-D leaf whose path matches `embedding_pattern` (the tied embedding).
  """
  leaves = named_leaves(params)
  inputs = [n for n in leaves if re.search(r"(^|/)W$", n)]
  recurrents = [n for n in leaves if re.search(r"(^|/)R$", n)]
  embeddings = [n for n in leaves if re.search(embedding_pattern, n) and jnp.ndim(leaves[n]) == 2]
  if not inputs or len(inputs) != len(recurrents):
    raise ValueError(f"expected matching 'W' and 'R' leaves per layer, got W: {inputs}, R: {recurrents}.")
  if len(embeddings) != 1:
    raise ValueError(f"embedding_pattern {embedding_pattern!r} must match one 2-D leaf, matched {embeddings}; "
                     f"paths are {list(leaves)}.")
  matrices = {}
  for l, (w, r) in enumerate(zip(inputs, recurrents)):
    matrices[f"layer{l}/W"] = leaves[w]
    matrices[f"layer{l}/R"] = leaves[r]
  matrices[DECODER] = leaves[embeddings[0]].T
  return matrices


def lm_matrix_inputs(embedded: jax.Array, layer_outputs: Sequence[jax.Array],
                     initial_outputs: Sequence[jax.Array] | None = None) -> dict[str, jax.Array]:
  """What each matrix multiplies, time-major [T, B, in], keyed like `lm_matrices`.

  `embedded`: the first layer's input; `layer_outputs[l]`: layer l's outputs y; `initial_outputs[l]` [B, H]:
  the output in layer l's carry before the window (the R input at t = 0; zeros when None).
  """
  if initial_outputs is None:
    initial_outputs = [jnp.zeros_like(y[0]) for y in layer_outputs]
  if len(initial_outputs) != len(layer_outputs):
    raise ValueError(f"got {len(initial_outputs)} initial outputs for {len(layer_outputs)} layers.")
  inputs = {}
  for l, (y, y0) in enumerate(zip(layer_outputs, initial_outputs)):
    inputs[f"layer{l}/W"] = embedded if l == 0 else layer_outputs[l - 1]
    inputs[f"layer{l}/R"] = jnp.concatenate([y0[None], y[:-1]], axis=0)
  inputs[DECODER] = layer_outputs[-1]
  return inputs


def carry_outputs(carry: Sequence[cells.Carry]) -> list[jax.Array]:
  """Each layer's previous output in an LM carry: the EGRU's events `y`, the GRU's or LSTM's `h`."""
  return [layer.y if isinstance(layer, cells.EGRUCarry) else layer.h for layer in carry]


def step_macs(matrices: dict[str, jax.Array], step_inputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Exact MACs of one time step per matrix and batch element (inputs [B, in]); jittable."""
  return {name: exact_macs(step_inputs[name], matrices[name]) for name in matrices}


class MacTally(NamedTuple):
  """Running counts over an evaluation split: tokens, nonzero tokens per input unit of each matrix and per
  output unit of each layer."""
  tokens: jax.Array
  input_counts: dict[str, jax.Array]
  output_counts: dict[str, jax.Array]


def init_tally(matrices: dict[str, jax.Array]) -> MacTally:
  num_layers = sum(name.endswith("/R") for name in matrices)
  return MacTally(
      tokens=jnp.zeros([], jnp.int32),
      input_counts={n: jnp.zeros(m.shape[0], jnp.int32) for n, m in matrices.items()},
      output_counts={f"layer{l}": jnp.zeros(matrices[f"layer{l}/R"].shape[0], jnp.int32)
                     for l in range(num_layers)})


def tally_batch(tally: MacTally, matrix_inputs: dict[str, jax.Array],
                layer_outputs: Sequence[jax.Array]) -> MacTally:
  """Adds one batch ([T, B, ...] inputs from `lm_matrix_inputs` and the layers' outputs); jittable."""
  tokens = layer_outputs[0].shape[0] * layer_outputs[0].shape[1]
  return MacTally(
      tokens=tally.tokens + tokens,
      input_counts={n: c + active_counts(matrix_inputs[n]) for n, c in tally.input_counts.items()},
      output_counts={f"layer{l}": tally.output_counts[f"layer{l}"] + active_counts(y)
                     for l, y in enumerate(layer_outputs)})


def tally_lm_window(tally: MacTally, embedding: jax.Array, tokens: jax.Array, events: Sequence[jax.Array],
                    initial_outputs: Sequence[jax.Array]) -> MacTally:
  """Adds one evaluation window of `LanguageModel`: `tokens` [B, T], `events` = aux['events'] (each
  [B, T, H]), `initial_outputs` = `carry_outputs` of the carry the window started from; jittable."""
  embedded = jnp.take(embedding, tokens.T, axis=0)
  outputs = [jnp.swapaxes(y, 0, 1) for y in events]
  return tally_batch(tally, lm_matrix_inputs(embedded, outputs, initial_outputs), outputs)


def mac_report(tally: MacTally, matrices: dict[str, jax.Array]) -> dict[str, Any]:
  """MACs per token (dense, exact, product approximation), reductions, activity and weight sparsity.

  Activity per layer is the fraction of nonzero outputs; 'pooled' is over all layers' units together.
  """
  tokens = int(tally.tokens)
  if tokens == 0:
    raise ValueError("the tally holds no tokens; add batches with tally_batch first.")
  per_matrix = {}
  for name, weight in matrices.items():
    weight = np.asarray(weight)
    rows = (weight != 0).sum(axis=1).astype(np.int64)
    counts = np.asarray(tally.input_counts[name], np.int64)
    dense = weight.size
    sparsity = float(1.0 - rows.sum() / dense)
    activity = float(counts.sum() / (tokens * weight.shape[0]))
    per_matrix[name] = {
        "dense": float(dense),
        "exact": float(counts @ rows) / tokens,
        "approx": dense * (1.0 - sparsity) * activity,
        "input_activity": activity,
        "weight_sparsity": sparsity,
    }
  totals = {kind: sum(m[kind] for m in per_matrix.values()) for kind in ("dense", "exact", "approx")}
  outputs = {n: np.asarray(c, np.int64) for n, c in tally.output_counts.items()}
  activity = {n: float(c.sum() / (tokens * c.size)) for n, c in outputs.items()}
  activity["pooled"] = float(sum(c.sum() for c in outputs.values()) / (tokens * sum(c.size for c in outputs.values())))
  return {
      "tokens": tokens,
      "macs_per_token": totals,
      "reduction": totals["dense"] / max(totals["exact"], 1e-12),
      "reduction_approx": totals["dense"] / max(totals["approx"], 1e-12),
      "activity": activity,
      "weight_sparsity": {n: m["weight_sparsity"] for n, m in per_matrix.items()},
      "matrices": per_matrix,
  }


def xla_flops(fn: Callable[..., Any], *args: Any) -> float:
  """XLA's compiled flop count of `fn(*args)` (a dot of (m, k) by (k, n) counts 2 m k n)."""
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis["flops"])


def dense_macs_per_token(matrices: dict[str, jax.Array]) -> int:
  return int(sum(np.size(m) for m in matrices.values()))


def dense_matmul_flops(matrices: dict[str, jax.Array], batch_size: int) -> tuple[float, float]:
  """(XLA flops, analytic 2 x dense MACs) of one time step's matrix products over a batch.

  Only the products are compiled, so XLA's count must equal twice the analytic MAC count exactly; the
  elementwise work of a cell step (gates, biases) is compared separately with a tolerance.
  """

  def products(inputs, weights):
    return {n: inputs[n] @ weights[n] for n in weights}

  inputs = {n: jnp.ones((batch_size, m.shape[0]), m.dtype) for n, m in matrices.items()}
  return xla_flops(products, inputs, dict(matrices)), 2.0 * batch_size * dense_macs_per_token(matrices)


def cell_step_flops(cell: str, batch_size: int, in_features: int, hidden_size: int) -> tuple[float, float]:
  """(XLA flops, analytic 2 x dense MACs) of one whole dense step of `cell`, input projection included.

  XLA also counts the gates' elementwise work, so its count exceeds the analytic one by a few flops per
  gate unit (measured 7 for the GRU, 9 for the LSTM, 12 for the EGRU with its statistics).
  """
  spec = cells.cell_spec(cell)
  width = spec.gates * hidden_size
  step = functools.partial(spec.step, gamma=1.0, eps=1.0) if cell == "egru" else spec.step
  params = {"R": jnp.ones((hidden_size, width)), "b_R": jnp.zeros(width)}
  if cell == "egru":
    params["theta"] = jnp.zeros(hidden_size)

  def one_step(inputs, carry, weight, bias, params):
    carry, outputs, _ = step(params, carry, inputs @ weight + bias)
    return carry, outputs

  flops = xla_flops(one_step, jnp.ones((batch_size, in_features)), cells.initial_carry(cell, batch_size, hidden_size),
                    jnp.ones((in_features, width)), jnp.zeros(width), params)
  return flops, 2.0 * batch_size * (in_features + hidden_size) * width
