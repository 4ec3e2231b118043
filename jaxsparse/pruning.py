"""Magnitude weight pruning: masks beside the optimizer state, layer-wise or global ranking, schedules.

Masks are a flat dict `{parameter path: bool array}` holding an entry only for prunable parameters (paths
are '/'-joined pytree keys, e.g. 'rnn/layers/0/W'), so they checkpoint with orbax as plain arrays and work
with any parameter pytree (`nnx.State`, nested dicts). `masked_updates` wraps an optax optimizer: its state
holds the masks and a step count; it updates the masks on the configured schedule and zeroes the gradients
and the updates of pruned weights, so whatever the inner optimizer does (momentum, weight decay) and however
the loop scales the updates, a zero weight stays zero. Weights pruned at a mask update are zeroed by
`apply_masks(params, masks_of(opt_state))` after applying the updates (the post-update step of jaxpruner),
and the forward pass may use `apply_masks` too. Pruned weights never regrow: they rank below live weights.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

METHODS = ("none", "one_shot", "gradual", "iterative")
RANKINGS = ("layerwise", "global")
DEFAULT_PRUNABLE = (r"(^|/)W$", r"(^|/)R$")

Masks = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class PruningConfig:
  """What to prune, how to rank weights and when.

  method: 'none'; 'one_shot' (prune to `target_sparsity` once, at `start_step`); 'gradual' (Zhu & Gupta:
    every `frequency` steps from `start_step` to `end_step`, s(t) = s_f + (s_i - s_f)(1 - progress)^3);
    'iterative' (prune-then-fine-tune: rounds at `start_step + k * frequency` up to `end_step`, the steps
    between rounds fine-tune; levels are `iterative_levels`, or by default a geometric ramp where each round
    removes the same fraction of the remaining weights and the last reaches `target_sparsity`).
  ranking: 'layerwise' (each matrix pruned to the sparsity) or 'global' (one magnitude threshold for all).
  prunable: regular expressions searched in each parameter path; matches are pruned.
  """
  method: str = "none"
  target_sparsity: float = 0.0
  initial_sparsity: float = 0.0
  ranking: str = "layerwise"
  start_step: int = 0
  end_step: int = 0
  frequency: int = 1
  iterative_levels: tuple[float, ...] = ()
  prunable: tuple[str, ...] = DEFAULT_PRUNABLE

  def __post_init__(self):
    object.__setattr__(self, "iterative_levels", tuple(float(s) for s in self.iterative_levels))
    object.__setattr__(self, "prunable", tuple(self.prunable))
    if self.method not in METHODS:
      raise ValueError(f"pruning method {self.method!r} is unknown; valid methods: {METHODS}.")
    if self.ranking not in RANKINGS:
      raise ValueError(f"pruning ranking {self.ranking!r} is unknown; valid rankings: {RANKINGS}.")
    if not 0.0 <= self.initial_sparsity <= self.target_sparsity < 1.0:
      raise ValueError(f"need 0 <= initial_sparsity ({self.initial_sparsity}) <= target_sparsity "
                       f"({self.target_sparsity}) < 1.")
    if self.start_step < 0:
      raise ValueError(f"start_step must be >= 0, got {self.start_step}.")
    if self.method in ("gradual", "iterative"):
      if self.frequency < 1:
        raise ValueError(f"frequency must be >= 1, got {self.frequency}.")
      if self.end_step < self.start_step or (self.end_step - self.start_step) % self.frequency:
        raise ValueError(f"end_step ({self.end_step}) - start_step ({self.start_step}) must be a non-negative "
                         f"multiple of frequency ({self.frequency}) so that the last update lands on end_step.")
    if self.method == "iterative" and self.iterative_levels:
      levels = self.iterative_levels
      if len(levels) != self.num_rounds:
        raise ValueError(f"iterative_levels has {len(levels)} entries but start_step, end_step and frequency "
                         f"give {self.num_rounds} rounds.")
      if any(b < a for a, b in zip(levels, levels[1:])) or not 0.0 <= levels[0] or levels[-1] >= 1.0:
        raise ValueError(f"iterative_levels {levels} must be non-decreasing sparsities in [0, 1).")
    if not self.prunable:
      raise ValueError(f"prunable must list at least one path pattern, e.g. {DEFAULT_PRUNABLE}.")
    for pattern in self.prunable:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"prunable pattern {pattern!r} is not a regular expression: {e}.") from e

  @property
  def num_rounds(self) -> int:
    return (self.end_step - self.start_step) // self.frequency + 1

  @property
  def levels(self) -> tuple[float, ...]:
    """The sparsity of each iterative round."""
    if self.iterative_levels:
      return self.iterative_levels
    n = self.num_rounds
    return tuple(1.0 - (1.0 - self.target_sparsity) ** ((k + 1) / n) for k in range(n))

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> PruningConfig:
    """Builds from a ConfigDict or dict, naming any unknown field."""
    items = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(items) - set(valid))
    if unknown:
      raise ValueError(f"unknown pruning config fields {unknown}; valid fields: {valid}.")
    return cls(**items)


def default_config() -> ml_collections.ConfigDict:
  """The defaults of `PruningConfig` as a ConfigDict, for experiment configs (every field is a flag)."""
  return ml_collections.ConfigDict(dataclasses.asdict(PruningConfig()))


def path_name(path: tuple) -> str:
  """'/'-joined names of a pytree key path, without the trailing '.value' of an nnx Variable."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    else:
      parts.append(str(getattr(key, "key", key)))
  if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name in ("value", "raw_value"):
    parts.pop()
  return "/".join(parts)


def named_leaves(tree: Any) -> dict[str, jax.Array]:
  """All leaves of a pytree keyed by `path_name`."""
  return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def prunable_names(params: Any, patterns: tuple[str, ...] = DEFAULT_PRUNABLE) -> list[str]:
  """Paths of the parameters matched by any pattern; raises if none match (a wrong pattern)."""
  names = list(named_leaves(params))
  chosen = [n for n in names if any(re.search(p, n) for p in patterns)]
  if not chosen:
    raise ValueError(f"prunable patterns {patterns} match no parameter; parameter paths are {names}.")
  return chosen


def init_masks(params: Any, patterns: tuple[str, ...] = DEFAULT_PRUNABLE) -> Masks:
  """All-True masks for the prunable parameters."""
  leaves = named_leaves(params)
  return {n: jnp.ones(jnp.shape(leaves[n]), bool) for n in prunable_names(params, patterns)}


def apply_masks(tree: Any, masks: Masks) -> Any:
  """`tree` (parameters, gradients or updates) with pruned entries set to zero; other leaves unchanged."""
  seen = set()

  def visit(path, leaf):
    name = path_name(path)
    if name not in masks:
      return leaf
    seen.add(name)
    if jnp.shape(leaf) != masks[name].shape:
      raise ValueError(f"mask for {name!r} has shape {masks[name].shape}, parameter has {jnp.shape(leaf)}.")
    return jnp.where(masks[name], leaf, jnp.zeros_like(leaf))

  out = jax.tree_util.tree_map_with_path(visit, tree)
  missing = sorted(set(masks) - seen)
  if missing:
    raise ValueError(f"masks {missing} name no leaf of the tree; its paths are {list(named_leaves(tree))}.")
  return out


def _keep_largest(scores: jax.Array, num_pruned: jax.Array) -> jax.Array:
  """Bool mask of the same shape keeping all but the `num_pruned` lowest scores (ties: lower index pruned)."""
  flat = scores.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  keep = jnp.zeros(flat.shape, bool).at[order].set(jnp.arange(flat.size) >= num_pruned)
  return keep.reshape(scores.shape)


def _num_pruned(sparsity: jax.Array, size: int) -> jax.Array:
  return jnp.round(jnp.asarray(sparsity, jnp.float32) * size).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames="ranking")
def magnitude_masks(params: Any, masks: Masks, sparsity: jax.Array | float,
                    ranking: str = "layerwise") -> Masks:
  """Masks pruning the smallest-magnitude weights to `sparsity` (jittable; `sparsity` may be traced).

  Already-pruned weights score below every live one, so they stay pruned. Layer-wise ranking prunes
  round(sparsity * size) weights of each matrix; global ranking prunes round(sparsity * total) weights
  under one threshold over all masked matrices.
  """
  if ranking not in RANKINGS:
    raise ValueError(f"pruning ranking {ranking!r} is unknown; valid rankings: {RANKINGS}.")
  leaves = named_leaves(params)
  scores = {n: jnp.where(m, jnp.abs(leaves[n]).astype(jnp.float32), -1.0) for n, m in masks.items()}
  if ranking == "layerwise":
    return {n: _keep_largest(s, _num_pruned(sparsity, s.size)) for n, s in scores.items()}
  names = list(scores)
  flat = jnp.concatenate([scores[n].reshape(-1) for n in names])
  keep = _keep_largest(flat, _num_pruned(sparsity, flat.size))
  offsets = np.cumsum([0] + [scores[n].size for n in names])
  return {n: keep[offsets[i]:offsets[i + 1]].reshape(scores[n].shape) for i, n in enumerate(names)}


def sparsity_at(step: jax.Array | int, config: PruningConfig) -> jax.Array:
  """Target sparsity of the schedule at `step` (0 before `start_step`)."""
  step = jnp.asarray(step)
  started = step >= config.start_step
  if config.method == "none":
    return jnp.float32(0.0)
  if config.method == "one_shot":
    return jnp.where(started, jnp.float32(config.target_sparsity), 0.0)
  span = max(config.end_step - config.start_step, 1)
  if config.method == "gradual":
    progress = jnp.clip((step - config.start_step) / span, 0.0, 1.0)
    s_i, s_f = config.initial_sparsity, config.target_sparsity
    sparsity = s_f + (s_i - s_f) * (1.0 - progress) ** 3
    return jnp.where(started, sparsity, 0.0).astype(jnp.float32)
  round_index = jnp.clip((step - config.start_step) // config.frequency, 0, config.num_rounds - 1)
  return jnp.where(started, jnp.asarray(config.levels, jnp.float32)[round_index], 0.0)


def is_update_step(step: jax.Array | int, config: PruningConfig) -> jax.Array:
  """Whether masks are recomputed at `step`."""
  step = jnp.asarray(step)
  if config.method == "none":
    return jnp.asarray(False)
  if config.method == "one_shot":
    return step == config.start_step
  in_window = (step >= config.start_step) & (step <= config.end_step)
  return in_window & ((step - config.start_step) % config.frequency == 0)


def update_masks(params: Any, masks: Masks, step: jax.Array | int, config: PruningConfig) -> Masks:
  """Masks after the schedule's update at `step` (unchanged on other steps); jittable."""
  if config.method == "none":
    return masks
  return jax.lax.cond(is_update_step(step, config),
                      lambda: magnitude_masks(params, masks, sparsity_at(step, config), config.ranking),
                      lambda: dict(masks))


class MaskedState(NamedTuple):
  """State of `masked_updates`: the number of updates so far, the masks, the inner optimizer's state."""
  count: jax.Array
  masks: Masks
  inner_state: optax.OptState


def masked_updates(inner: optax.GradientTransformation, config: PruningConfig) -> optax.GradientTransformation:
  """Wraps `inner` so pruned weights receive zero gradient and zero update.

  Each `update(grads, state, params)` first updates the masks on the schedule (step = `count`, the number of
  updates so far), zeroes the gradients of pruned weights, runs `inner` and zeroes its updates of pruned
  weights. After applying the updates the loop calls `apply_masks(params, masks_of(opt_state))`, which zeroes
  the weights pruned at this step and is a no-op otherwise.
  """

  def init(params: Any) -> MaskedState:
    return MaskedState(jnp.zeros([], jnp.int32), init_masks(params, config.prunable), inner.init(params))

  def update(updates: Any, state: MaskedState, params: Any = None):
    if params is None:
      raise ValueError("masked_updates needs the parameters: call tx.update(grads, opt_state, params).")
    masks = update_masks(params, state.masks, state.count, config)
    updates, inner_state = inner.update(apply_masks(updates, masks), state.inner_state, params)
    return apply_masks(updates, masks), MaskedState(optax.safe_increment(state.count), masks, inner_state)

  return optax.GradientTransformation(init, update)


def masks_of(opt_state: Any) -> Masks:
  """The masks held by the `masked_updates` state inside `opt_state` (which may be a chain)."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, MaskedState))
           if isinstance(s, MaskedState)]
  if len(found) != 1:
    raise ValueError(f"expected one masked_updates state in the optimizer state, found {len(found)}.")
  return found[0].masks


def sparsity_report(params: Any, patterns: tuple[str, ...] = DEFAULT_PRUNABLE) -> dict[str, Any]:
  """Fraction of exactly-zero weights per matched matrix and over all of them together."""
  leaves = named_leaves(params)
  zeros = {n: int(np.sum(np.asarray(leaves[n]) == 0)) for n in prunable_names(params, patterns)}
  sizes = {n: int(np.size(leaves[n])) for n in zeros}
  return {"per_matrix": {n: zeros[n] / sizes[n] for n in zeros},
          "overall": sum(zeros.values()) / sum(sizes.values())}
