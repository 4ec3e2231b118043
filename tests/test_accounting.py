"""MAC accounting: exact counts against brute-force loops, the product formula, dense counts against XLA."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsparse import accounting, pruning
from jaxsparse.lm import LanguageModel

T, B, D, H, V = 4, 3, 5, 6, 9


def _sparse(rng: np.random.Generator, shape: tuple[int, ...], density: float) -> jax.Array:
  return jnp.asarray(rng.normal(size=shape) * (rng.random(shape) < density), jnp.float32)


def _brute_force(inputs: np.ndarray, weight: np.ndarray) -> int:
  """MACs of an event-driven engine: every nonzero input times every nonzero weight of its row."""
  count = 0
  for index in itertools.product(*map(range, inputs.shape)):
    if inputs[index] != 0:
      for j in range(weight.shape[1]):
        count += int(weight[index[-1], j] != 0)
  return count


@pytest.fixture(scope="module")
def case():
  """Two layers (D -> H -> D) plus the tied decoder, pruned weights, sparse events, a nonzero initial carry."""
  rng = np.random.default_rng(0)
  matrices = {
      "layer0/W": _sparse(rng, (D, 3 * H), 0.6),
      "layer0/R": _sparse(rng, (H, 3 * H), 0.3),
      "layer1/W": _sparse(rng, (H, 3 * D), 0.5),
      "layer1/R": _sparse(rng, (D, 3 * D), 0.8),
      "decoder": _sparse(rng, (V, D), 0.7).T,
  }
  embedded = _sparse(rng, (T, B, D), 1.0)
  outputs = [_sparse(rng, (T, B, H), 0.3), _sparse(rng, (T, B, D), 0.5)]
  initial = [_sparse(rng, (B, H), 0.5), _sparse(rng, (B, D), 0.5)]
  inputs = accounting.lm_matrix_inputs(embedded, outputs, initial)
  return matrices, inputs, outputs


def test_exact_count_equals_brute_force_per_step_and_matrix(case):
  matrices, inputs, _ = case
  step_count = jax.jit(accounting.step_macs)
  for t in range(T):
    got = step_count(matrices, {n: x[t] for n, x in inputs.items()})
    for name, weight in matrices.items():
      for b in range(B):
        want = _brute_force(np.asarray(inputs[name][t, b]), np.asarray(weight))
        assert int(got[name][b]) == want, (t, b, name)


def test_recurrent_inputs_are_shifted_outputs_with_initial_carry(case):
  _, inputs, outputs = case
  np.testing.assert_array_equal(inputs["layer1/R"][1:], outputs[1][:-1])
  np.testing.assert_array_equal(inputs["layer1/W"], outputs[0])
  np.testing.assert_array_equal(inputs["decoder"], outputs[1])


def test_report_totals_match_brute_force_formula_and_shapes(case):
  matrices, inputs, outputs = case
  tally = accounting.init_tally(matrices)
  add = jax.jit(accounting.tally_batch)
  tally = add(add(tally, inputs, outputs), inputs, outputs)
  report = accounting.mac_report(tally, matrices)
  tokens = 2 * T * B
  assert report["tokens"] == tokens
  exact = {n: 2 * _brute_force(np.asarray(inputs[n]), np.asarray(w)) / tokens for n, w in matrices.items()}
  for name, weight in matrices.items():
    weight, x = np.asarray(weight), np.asarray(inputs[name])
    row = report["matrices"][name]
    assert row["dense"] == weight.shape[0] * weight.shape[1]
    np.testing.assert_allclose(row["exact"], exact[name], rtol=1e-12)
    np.testing.assert_allclose(row["weight_sparsity"], np.mean(weight == 0))
    np.testing.assert_allclose(row["input_activity"], np.mean(x != 0))
    np.testing.assert_allclose(row["approx"], weight.size * np.mean(weight != 0) * np.mean(x != 0))
  assert report["macs_per_token"]["dense"] == D * 3 * H + H * 3 * H + H * 3 * D + D * 3 * D + D * V
  np.testing.assert_allclose(report["macs_per_token"]["exact"], sum(exact.values()))
  np.testing.assert_allclose(report["reduction"], report["macs_per_token"]["dense"] / sum(exact.values()))
  np.testing.assert_allclose(report["activity"]["layer0"], np.mean(np.asarray(outputs[0]) != 0))
  pooled = (np.sum(np.asarray(outputs[0]) != 0) + np.sum(np.asarray(outputs[1]) != 0)) / (T * B * (H + D))
  np.testing.assert_allclose(report["activity"]["pooled"], pooled)


def test_dense_matmul_flops_equal_twice_the_macs():
  matrices = {"layer0/W": jnp.ones((7, 15)), "layer0/R": jnp.ones((5, 15)), "decoder": jnp.ones((5, 11))}
  xla, analytic = accounting.dense_matmul_flops(matrices, batch_size=4)
  assert analytic == 2 * 4 * (7 * 15 + 5 * 15 + 5 * 11)
  assert xla == analytic


@pytest.mark.parametrize("cell,gates", [("gru", 3), ("egru", 3), ("lstm", 4)])
def test_whole_dense_step_flops_exceed_macs_by_elementwise_work_only(cell, gates):
  batch, in_features, hidden = 4, 6, 5
  xla, analytic = accounting.cell_step_flops(cell, batch, in_features, hidden)
  assert analytic == 2 * batch * (in_features + hidden) * gates * hidden
  assert analytic <= xla <= analytic + 16 * batch * gates * hidden


@pytest.fixture(scope="module")
def language_models():
  return {cell: LanguageModel(V, D, (H, D), cell, rngs=nnx.Rngs(1)) for cell in ("gru", "egru")}


def _evaluate(model: LanguageModel, params, windows: int = 2):
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  matrices = accounting.lm_matrices(params)

  @jax.jit
  def window(params, carry, tally, tokens):
    model = nnx.merge(graphdef, params, rest)
    _, new_carry, aux = model(tokens, carry, return_events=True)
    tally = accounting.tally_lm_window(tally, params["embedding"][...], tokens, aux["events"],
                                       accounting.carry_outputs(carry))
    return new_carry, tally, aux

  carry, tally = model.initial_carry(B), accounting.init_tally(matrices)
  tokens = jax.random.randint(jax.random.key(5), (windows, B, T), 0, V)
  history = []
  for w in range(windows):
    previous = carry
    carry, tally, aux = window(params, carry, tally, tokens[w])
    history.append((tokens[w], previous, aux))
  return matrices, accounting.mac_report(tally, matrices), history


def test_unpruned_gru_model_costs_exactly_the_dense_count(language_models):
  model = language_models["gru"]
  _, params, _ = nnx.split(model, nnx.Param, ...)
  matrices, report, _ = _evaluate(model, params)
  assert sorted(matrices) == ["decoder", "layer0/R", "layer0/W", "layer1/R", "layer1/W"]
  assert report["macs_per_token"]["dense"] == D * 3 * H + H * 3 * H + H * 3 * D + D * 3 * D + D * V
  # The very first R step reads the all-zero initial carry, the rest reads dense GRU outputs.
  first_window_recurrent = (H * 3 * H + D * 3 * D) * B / (2 * T * B)
  np.testing.assert_allclose(report["macs_per_token"]["exact"],
                             report["macs_per_token"]["dense"] - first_window_recurrent)


def test_pruned_egru_model_matches_brute_force_over_windows(language_models):
  model = language_models["egru"]
  _, params, _ = nnx.split(model, nnx.Param, ...)
  masks = pruning.magnitude_masks(params, pruning.init_masks(params, (r"W$", r"R$", r"embedding$")), 0.6)
  params = pruning.apply_masks(params, masks)
  matrices, report, history = _evaluate(model, params)
  embedding = np.asarray(params["embedding"][...])
  total = 0
  for tokens, carry, aux in history:
    events = [np.asarray(y) for y in aux["events"]]
    initial = [np.asarray(c.y) for c in carry]
    for b, t in itertools.product(range(B), range(T)):
      x = embedding[int(tokens[b, t])]
      for l, y in enumerate(events):
        previous = initial[l][b] if t == 0 else y[b, t - 1]
        total += _brute_force(x, np.asarray(matrices[f"layer{l}/W"]))
        total += _brute_force(previous, np.asarray(matrices[f"layer{l}/R"]))
        x = y[b, t]
      total += _brute_force(x, np.asarray(matrices["decoder"]))
  np.testing.assert_allclose(report["macs_per_token"]["exact"], total / (2 * B * T))
  assert report["macs_per_token"]["exact"] < 0.6 * report["macs_per_token"]["dense"]
  np.testing.assert_allclose(report["weight_sparsity"]["decoder"], 0.6, atol=1 / (D * V))
  assert 0.0 < report["activity"]["pooled"] < 1.0
