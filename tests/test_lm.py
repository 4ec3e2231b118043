"""The language model: shapes, tied decoder, dropout only in training, carry semantics, and that it learns."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxsparse import cells, lm

V, E, B, T = 11, 16, 2, 7
SIZES = (16, 16, E)


def _model(**kwargs) -> lm.LanguageModel:
  return lm.LanguageModel(V, E, SIZES, rngs=nnx.Rngs(0), **kwargs)


def _forward(model: lm.LanguageModel):
  """A jitted pure forward (split once): (tokens, carry, key, train, return_events) -> model outputs."""
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnames=("train", "return_events"))
  def forward(tokens, carry, key, train=False, return_events=False):
    return nnx.merge(graphdef, state)(tokens, carry, key, train=train, return_events=return_events)

  return forward


@pytest.fixture(scope="module")
def model():
  return _model()


@pytest.fixture(scope="module")
def forward(model):
  return _forward(model)


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(0), (B, T), 0, V - 1)


def test_shapes_and_aux(model, forward, tokens):
  logits, carry, aux = forward(tokens, model.initial_carry(B), jax.random.key(1), train=True, return_events=True)
  assert logits.shape == (B, T, V)
  assert len(carry) == 3 and all(isinstance(c, cells.EGRUCarry) for c in carry)
  assert [c.y.shape for c in carry] == [(B, size) for size in SIZES]
  assert aux["activity"].shape == (3,) and aux["backward_sparsity"].shape == (3,)
  assert aux["activity_regularizer"].shape == () and aux["mean_activity"].shape == ()
  assert [e.shape for e in aux["events"]] == [(B, T, size) for size in SIZES]
  for layer, events in enumerate(aux["events"]):
    np.testing.assert_allclose(aux["activity"][layer], np.mean(np.asarray(events) != 0), rtol=1e-6)
    np.testing.assert_allclose(carry[layer].y, events[:, -1], rtol=1e-6)
  assert 0.0 < float(aux["mean_activity"]) < 1.0
  _, _, aux_without = forward(tokens, model.initial_carry(B), None)
  assert "events" not in aux_without


def test_decoder_is_tied_to_the_embedding(model, forward, tokens):
  logits, _, aux = forward(tokens, model.initial_carry(B), None, return_events=True)
  top = np.asarray(aux["events"][-1])
  np.testing.assert_allclose(logits, top @ np.asarray(model.embedding[...]).T + np.asarray(model.output_bias[...]),
                             rtol=1e-5, atol=1e-6)
  vocab_shaped = [leaf for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)) if leaf.shape[0] == V]
  assert sorted(leaf.shape for leaf in vocab_shaped) == [(V,), (V, E)]

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    logits, _, _ = nnx.merge(graphdef, params, rest)(tokens, model.initial_carry(B))
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

  grad = jax.jit(jax.grad(loss))(params)["embedding"][...]
  absent = V - 1
  assert not np.any(np.asarray(tokens) == absent)
  assert np.abs(grad[absent]).sum() > 0, "only the decoder can reach a row of a token absent from the input"


def test_dropout_only_in_training(model, forward, tokens):
  carry = model.initial_carry(B)
  eval_a, _, _ = forward(tokens, carry, jax.random.key(1))
  eval_b, _, _ = forward(tokens, carry, jax.random.key(2))
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a, _, _ = forward(tokens, carry, jax.random.key(1), train=True)
  train_a_again, _, _ = forward(tokens, carry, jax.random.key(1), train=True)
  train_b, _, _ = forward(tokens, carry, jax.random.key(2), train=True)
  np.testing.assert_array_equal(train_a, train_a_again)
  assert not np.allclose(train_a, train_b)
  assert not np.allclose(train_a, eval_a)
  with pytest.raises(ValueError, match="key"):
    model(tokens, carry, None, train=True)


def _carry_with(model, y_scale, c_scale):
  keys = iter(jax.random.split(jax.random.key(5), 6))
  return tuple(cells.EGRUCarry(y=y_scale * jax.random.uniform(next(keys), c.y.shape),
                               c=c_scale * jax.random.normal(next(keys), c.c.shape))
               for c in model.initial_carry(B))


def test_egru_carries_events_and_resets_internal_state_each_window(model, forward, tokens):
  zero_state, _, _ = forward(tokens, _carry_with(model, 0.0, 0.0), None)
  random_c, _, _ = forward(tokens, _carry_with(model, 0.0, 1.0), None)
  random_y, _, _ = forward(tokens, _carry_with(model, 1.0, 0.0), None)
  np.testing.assert_array_equal(zero_state, random_c)
  assert not np.allclose(zero_state, random_y)

  carrying = _model(carry_internal_state=True)
  carrying_forward = _forward(carrying)
  np.testing.assert_array_equal(carrying_forward(tokens, _carry_with(model, 0.0, 0.0), None)[0], zero_state)
  assert not np.allclose(carrying_forward(tokens, _carry_with(model, 0.0, 1.0), None)[0], zero_state)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_dense_baselines_share_the_interface_and_carry_their_whole_state(cell, tokens):
  dense = lm.LanguageModel(V, E, (E, E), cell=cell, rngs=nnx.Rngs(0))
  logits, carry, aux = dense(tokens, dense.initial_carry(B))
  assert logits.shape == (B, T, V)
  np.testing.assert_array_equal(aux["activity"], [1.0, 1.0])
  shifted = tuple(type(c)(*(jnp.full_like(v, 0.5) for v in c)) for c in carry)
  assert not np.allclose(dense(tokens, shifted)[0], logits)


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_sizes=(16, 8)), "embedding_size"),
    (dict(cell="rnn"), "valid cells"),
    (dict(dropconnect=1.0), "dropconnect"),
])
def test_bad_configuration_is_rejected(kwargs, message):
  arguments = dict(vocab_size=V, embedding_size=E, hidden_sizes=SIZES) | kwargs
  with pytest.raises(ValueError, match=message):
    lm.LanguageModel(**arguments, rngs=nnx.Rngs(0))


def test_tiny_egru_lm_learns_a_repeating_sequence():
  """Next token = (token + 1) mod 8: the loss must fall well below the uniform log 8 within 50 steps."""
  vocab = 8
  model = lm.LanguageModel(vocab, E, SIZES, rngs=nnx.Rngs(3), word_dropout=0.0, embedding_dropout=0.0,
                           between_dropout=0.0, output_dropout=0.0, dropconnect=0.0)
  stream = (jnp.arange(4)[:, None] * 3 + jnp.arange(17)[None, :]) % vocab
  inputs, targets = stream[:, :-1], stream[:, 1:]
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  optimizer = optax.adam(3e-2)
  carry = model.initial_carry(inputs.shape[0])

  @jax.jit
  def train_step(params, opt_state, key):
    def loss_fn(params):
      logits, _, _ = nnx.merge(graphdef, params, rest)(inputs, carry, key, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  losses = []
  for key in jax.random.split(jax.random.key(0), 50):
    params, opt_state, loss = train_step(params, opt_state, key)
    losses.append(float(loss))
  assert losses[0] > 0.9 * np.log(vocab)
  assert np.mean(losses[-5:]) < 0.25 * losses[0], losses
