"""Pruning: masks survive AdamW and checkpoints, schedules hit their targets, global vs layer-wise ranking."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxsparse import pruning
from jaxsparse.rnn import RecurrentStack
from trainkit.checkpoint import Checkpointer


def _params(seed: int = 0) -> dict:
  keys = jax.random.split(jax.random.key(seed), 5)
  return {
      "embed": {"embedding": jax.random.normal(keys[0], (11, 5))},
      "layers": [
          {"W": jax.random.normal(keys[1], (5, 21)), "R": jax.random.normal(keys[2], (7, 21)), "b_W": jnp.ones(21)},
          {"W": jax.random.normal(keys[3], (7, 21)), "R": jax.random.normal(keys[4], (7, 21)), "b_W": jnp.ones(21)},
      ],
  }


def _grads(params: dict, step: int) -> dict:
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(100 + step), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


LOOP_SCALE = 0.5  # the loop may rescale updates (e.g. multiply a direction by the learning rate)
GRADUAL = pruning.PruningConfig(method="gradual", target_sparsity=0.75, start_step=0, end_step=4, frequency=2)


def _train(config: pruning.PruningConfig, steps: int, params: dict | None = None, opt_state=None):
  tx = pruning.masked_updates(optax.adamw(0.05, b1=0.9, weight_decay=0.3), config)
  params = _params() if params is None else params
  opt_state = tx.init(params) if opt_state is None else opt_state

  @jax.jit
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + LOOP_SCALE * u, params, updates)
    return pruning.apply_masks(params, pruning.masks_of(opt_state)), opt_state, updates

  history = []
  for _ in range(steps):
    count = int(opt_state.count)
    params, opt_state, updates = step(params, opt_state, _grads(params, count))
    history.append((params, pruning.masks_of(opt_state), updates))
  return params, opt_state, history


@pytest.fixture(scope="module")
def trained():
  return _train(GRADUAL, steps=7)


def test_pruned_weights_stay_exactly_zero_under_adamw(trained):
  params, _, history = trained
  leaves = pruning.named_leaves(params)
  initial = pruning.named_leaves(_params())
  for step_params, masks, updates in history:
    named, named_updates = pruning.named_leaves(step_params), pruning.named_leaves(updates)
    assert set(masks) == {"layers/0/W", "layers/0/R", "layers/1/W", "layers/1/R"}
    for name, mask in masks.items():
      np.testing.assert_array_equal(np.asarray(named_updates[name])[~np.asarray(mask)], 0.0)
      np.testing.assert_array_equal(np.asarray(named[name])[~np.asarray(mask)], 0.0)
  for name, mask in history[-1][1].items():
    mask = np.asarray(mask)
    assert abs((~mask).sum() - round(0.75 * mask.size)) <= 1
    assert np.all(np.asarray(leaves[name])[mask] != np.asarray(initial[name])[mask])
  np.testing.assert_array_equal(np.asarray(leaves["embed/embedding"]) != np.asarray(initial["embed/embedding"]), True)


def test_live_weights_follow_inner_adamw_exactly():
  config = pruning.PruningConfig(method="one_shot", target_sparsity=0.5, start_step=0)
  params, opt_state, history = _train(config, steps=3)
  masks = history[0][1]
  reference_tx = optax.adamw(0.05, b1=0.9, weight_decay=0.3)
  reference = _params()
  reference_state = reference_tx.init(reference)
  for count in range(3):
    grads = pruning.apply_masks(_grads(reference, count), masks)
    updates, reference_state = reference_tx.update(grads, reference_state, reference)
    reference = jax.tree.map(lambda p, u: p + LOOP_SCALE * u, reference, updates)
  got, want = pruning.named_leaves(params), pruning.named_leaves(reference)
  for name in got:
    keep = np.asarray(masks[name]) if name in masks else np.ones(got[name].shape, bool)
    np.testing.assert_allclose(np.asarray(got[name])[keep], np.asarray(want[name])[keep], rtol=1e-6, atol=1e-7)


def test_masks_and_zeros_survive_orbax_round_trip(trained, tmp_path):
  params, opt_state, _ = trained
  checkpointer = Checkpointer(tmp_path / "ckpt")
  checkpointer.save(7, {"params": params, "opt_state": opt_state}, {"position": 7}, wait=True)
  template = _params(seed=1)
  template_state = pruning.masked_updates(optax.adamw(0.05, weight_decay=0.3), GRADUAL).init(template)
  restored, meta = checkpointer.restore_latest({"params": template, "opt_state": template_state})
  checkpointer.close()
  assert meta == {"position": 7}
  masks, restored_masks = pruning.masks_of(opt_state), pruning.masks_of(restored["opt_state"])
  for name in masks:
    assert restored_masks[name].dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(restored_masks[name]), np.asarray(masks[name]))
  resumed, _, history = _train(GRADUAL, steps=2, params=restored["params"], opt_state=restored["opt_state"])
  named = pruning.named_leaves(resumed)
  for name, mask in history[-1][1].items():
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(masks[name]))
    np.testing.assert_array_equal(np.asarray(named[name])[~np.asarray(mask)], 0.0)


def test_polynomial_schedule_hits_targets_on_its_frequency():
  config = pruning.PruningConfig(method="gradual", initial_sparsity=0.1, target_sparsity=0.8, start_step=10,
                                 end_step=50, frequency=10)
  steps = np.arange(0, 81)
  sparsity = np.array([float(pruning.sparsity_at(s, config)) for s in steps])
  updates = [s for s in steps if bool(pruning.is_update_step(s, config))]
  assert updates == [10, 20, 30, 40, 50]
  np.testing.assert_allclose(sparsity[:10], 0.0)
  np.testing.assert_allclose(sparsity[10], 0.1, rtol=1e-6)
  np.testing.assert_allclose(sparsity[50:], 0.8, rtol=1e-6)
  assert np.all(np.diff(sparsity) >= -1e-7)
  progress = (30 - 10) / 40
  np.testing.assert_allclose(sparsity[30], 0.8 + (0.1 - 0.8) * (1 - progress) ** 3, rtol=1e-6)


@pytest.mark.parametrize("ranking", pruning.RANKINGS)
def test_achieved_sparsity_follows_schedule_within_one_element(ranking):
  config = pruning.PruningConfig(method="gradual", initial_sparsity=0.05, target_sparsity=0.9, start_step=2,
                                 end_step=8, frequency=3, ranking=ranking)
  params = _params()
  masks = pruning.init_masks(params)
  update = jax.jit(lambda p, m, s: pruning.update_masks(p, m, s, config))
  total = sum(m.size for m in masks.values())
  target = 0.0
  for step in range(12):
    new_masks = update(params, masks, step)
    if step not in (2, 5, 8):
      for name in masks:
        np.testing.assert_array_equal(np.asarray(new_masks[name]), np.asarray(masks[name]))
    for name in masks:
      assert not np.any(np.asarray(new_masks[name]) & ~np.asarray(masks[name])), "a pruned weight regrew"
    masks = new_masks
    if bool(pruning.is_update_step(step, config)):
      target = float(pruning.sparsity_at(step, config))
    pruned = {n: int((~np.asarray(m)).sum()) for n, m in masks.items()}
    if ranking == "layerwise":
      for name, count in pruned.items():
        assert abs(count - target * masks[name].size) <= 1, (step, name)
    else:
      assert abs(sum(pruned.values()) - target * total) <= 1, step
  report = pruning.sparsity_report(pruning.apply_masks(params, masks))
  np.testing.assert_allclose(report["overall"], 0.9, atol=len(masks) / total)


def test_iterative_levels_are_geometric_and_end_at_target():
  config = pruning.PruningConfig(method="iterative", target_sparsity=0.875, start_step=0, end_step=20,
                                 frequency=10)
  np.testing.assert_allclose(config.levels, [0.5, 0.75, 0.875])
  got = [float(pruning.sparsity_at(s, config)) for s in (0, 9, 10, 19, 20, 30)]
  np.testing.assert_allclose(got, [0.5, 0.5, 0.75, 0.75, 0.875, 0.875], rtol=1e-6)
  assert [s for s in range(40) if bool(pruning.is_update_step(s, config))] == [0, 10, 20]
  one_shot = pruning.PruningConfig(method="one_shot", target_sparsity=0.3, start_step=5)
  assert [s for s in range(40) if bool(pruning.is_update_step(s, one_shot))] == [5]


def test_global_ranking_prunes_small_scale_matrix_more_layerwise_equally():
  keys = jax.random.split(jax.random.key(3), 2)
  params = {"small": {"W": 0.01 * jax.random.normal(keys[0], (20, 30))},
            "large": {"W": jax.random.normal(keys[1], (30, 20))}}
  masks = pruning.init_masks(params)
  sparsity = lambda m: 1.0 - float(np.mean(np.asarray(m)))
  layerwise = pruning.magnitude_masks(params, masks, 0.5, "layerwise")
  assert sparsity(layerwise["small/W"]) == sparsity(layerwise["large/W"]) == 0.5
  global_ = pruning.magnitude_masks(params, masks, 0.5, "global")
  assert sparsity(global_["small/W"]) > 0.95 and sparsity(global_["large/W"]) < 0.05
  assert (~np.asarray(global_["small/W"])).sum() + (~np.asarray(global_["large/W"])).sum() == 600
  kept_small = np.abs(np.asarray(params["small"]["W"]))[np.asarray(global_["small/W"])]
  pruned_large = np.abs(np.asarray(params["large"]["W"]))[~np.asarray(global_["large/W"])]
  assert kept_small.size == 0 or pruned_large.size == 0 or kept_small.min() >= pruned_large.max()


def test_masked_updates_work_on_nnx_state():
  stack = RecurrentStack("gru", 4, [6, 5], rngs=nnx.Rngs(0))
  _, params, _ = nnx.split(stack, nnx.Param, ...)
  tx = pruning.masked_updates(optax.adamw(0.1, weight_decay=0.1),
                              pruning.PruningConfig(method="one_shot", target_sparsity=0.5))
  opt_state = tx.init(params)
  masks = pruning.masks_of(opt_state)
  assert sorted(masks) == ["layers/0/R", "layers/0/W", "layers/1/R", "layers/1/W"]
  grads = jax.tree.map(jnp.ones_like, params)
  updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
  pruned = pruning.apply_masks(optax.apply_updates(params, updates), pruning.masks_of(opt_state))
  assert isinstance(pruned, nnx.State)
  report = pruning.sparsity_report(pruned)
  np.testing.assert_allclose(list(report["per_matrix"].values()), 0.5, atol=1 / 30)
  assert report["per_matrix"]["layers/1/R"] == float(np.mean(np.asarray(pruned["layers"][1]["R"][...]) == 0))
  for name, mask in pruning.masks_of(opt_state).items():
    np.testing.assert_array_equal(np.asarray(pruning.named_leaves(updates)[name])[~np.asarray(mask)], 0.0)


def test_bad_config_values_raise_with_valid_options():
  with pytest.raises(ValueError, match="valid methods"):
    pruning.PruningConfig(method="random")
  with pytest.raises(ValueError, match="valid rankings"):
    pruning.PruningConfig(ranking="per_row")
  with pytest.raises(ValueError, match="multiple of frequency"):
    pruning.PruningConfig(method="gradual", target_sparsity=0.5, start_step=0, end_step=7, frequency=2)
  with pytest.raises(ValueError, match="valid fields"):
    pruning.PruningConfig.from_config({"method": "gradual", "sparsity": 0.5})
  with pytest.raises(ValueError, match="match no parameter"):
    pruning.init_masks(_params(), (r"kernel$",))
  config = pruning.default_config()
  config.method, config.target_sparsity, config.end_step = "iterative", 0.5, 3
  levels = pruning.PruningConfig.from_config(config).levels
  np.testing.assert_allclose(levels, [1 - 0.5 ** (k / 4) for k in (1, 2, 3, 4)])
