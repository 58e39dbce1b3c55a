r"""Optimiser of every stage: torch-equivalent AdamW, the original LR schedule, frozen subtrees.

AdamW: `optax.adamw` computes `p <- p - lr_t * (adam_update + wd * p)`, which is exactly
torch.optim.AdamW's decoupled decay `p <- p * (1 - lr_t * wd)` followed by
`p <- p - lr_t * adam_update` (the decay is scaled by the scheduled learning rate in both), with the
same bias corrections and `eps` outside the square root.

Schedules, stepped once per optimiser update like the original's `scheduler.step()` after every
`optimizer.step()`:
- 'warmup_cosine' (the original's default: `src/optimizer/optimizer.py::WarmupScheduler` around
  `CosineAnnealingLR(T_max=total_steps)`), reproduced with its quirks, see `warmup_cosine_schedule`;
- 'cosine': a plain per-step `CosineAnnealingLR(T_max=total_steps)`;
- 'linear_warmup_cosine': a linear warmup from lr / W to lr over the W warmup steps, then a cosine
  from lr to 0 over the remaining steps (the usual recipe, e.g. SONICHU's "cosine, 3-epoch warmup");
- 'ijepa_warmup_cosine': I-JEPA's, a linear warmup from `optim.start_lr` to lr, then a cosine to
  `optim.final_lr`, see `ijepa_warmup_cosine_schedule`;
- 'constant'.
`optim.final_weight_decay` ramps the weight decay from `optim.weight_decay` to it on a cosine over
the run (I-JEPA's 0.04 -> 0.4, `cosine_weight_decay_schedule`).

Frozen parameters (regexes over '/'-joined parameter paths, `re.fullmatch`) get `optax.set_to_zero`
through `optax.multi_transform`: no update, no weight decay, no Adam moments, and they do not count
in the gradient norm that is clipped or logged (in the original they have no `.grad`).

Weight decay can be switched off for some parameters (`optim.no_decay`: regexes over the paths,
e.g. biases and norms as in ViTPose's `paramwise_cfg`).

Sparse groups (`optim.sparse_groups`: regexes over the paths whose first capture group names the
group, e.g. `heads_(\w+)/.*` gives one group per task head): a group whose gradients are all exactly
zero in a step, because the step's loss did not use it, gets no update at all: no weight decay, no
Adam moment decay, no step count for its bias corrections. This is torch.optim.AdamW on parameters
whose `.grad` is None (multi-task models that run one head per batch); plain AdamW would decay the
unused heads and their moments every step. The learning-rate schedule stays global (one
`scheduler.step()` per optimiser step), as in torch. A used group whose gradient happens to be
exactly zero everywhere is skipped too, where torch would still decay it.

Layer-wise learning-rate decay (`optim.layer_decay`: the rate, 0 = off), as ViTPose's
`LayerDecayOptimizerConstructor` (mmcv_custom/layer_decay_optimizer_constructor.py) and MAE do it:
every parameter gets a layer id, and its whole update is multiplied by
rate ** (num_layers - layer_id - 1). The model's config gives the ids, so that this module knows
no model: `optim.layer_ids` is an ordered list of (regex, first id) rules over the paths; the first
rule that fully matches gives `first id`, plus the integer of its first capture group if it has one
(e.g. `(r'backbone/blocks_(\d+)/.*', 1)`: block i is layer i + 1); a parameter that no rule matches
is layer num_layers - 1 (scale 1), as ViTPose's final norm and heads; `optim.num_layers` is that
count (ViTPose: depth + 2). The scale multiplies the update after the weight decay, so the decay is
scaled too: torch's AdamW decays by lr_group * wd with each group's own lr, and ViTPose's groups
keep the unscaled `weight_decay` while their lr is scaled. It composes with the rest: frozen
parameters stay at zero, unused sparse groups stay untouched, clipping sees the unscaled gradients
(torch clips before the step, whatever the groups' learning rates).
"""
from collections.abc import Mapping, Sequence
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ultrasound_common import errors

TRAINABLE, FROZEN, SPARSE = 'trainable', 'frozen', 'sparse'
SCHEDULES = ('warmup_cosine', 'cosine', 'linear_warmup_cosine', 'ijepa_warmup_cosine', 'constant')


def _cos_half_squared(steps_left, total_steps):
  """cos^2(pi e / 2T) = (1 + cos(pi e / T)) / 2, computed as sin^2(pi (T - e) / 2T).

  Takes the integer `T - e`. The sine form stays accurate in float32 at the end of training, where
  `1 + cos(.)` cancels to exactly 0 and the ratio in `warmup_cosine_schedule` would become 0 / 0.
  """
  return jnp.square(jnp.sin(jnp.pi * steps_left / (2.0 * total_steps)))


def warmup_cosine_schedule(base_lr: float, total_steps: int,
                           warmup_steps: int) -> optax.Schedule:
  """The learning rate that the original DualTrack uses at optimiser step k (0-based).

  The original builds `WarmupScheduler(CosineAnnealingLR(T_max=T), initial_lr_factor=f)` with
  T = total_steps (warmup included) and f = base_lr / 1000 (its "initial factor" bug: a fraction
  of base_lr was meant), and calls `scheduler.step()` after every optimiser step. Tracing that code
  under torch 2.7.1 (pinned in its requirements.txt) gives, with c = k + 1 (the constructor already
  steps once) and W = warmup_steps:
  - c < W: lr = base_lr * (f + (1 - f) * c / W)  (linear warmup; step 0 already uses c = 1);
  - else, with e = c - W, the wrapper calls `cosine.step(e)` (closed form: lr = base_lr *
    (1 + cos(pi e / T)) / 2) and then returns the *chainable* `cosine.get_lr()`, which multiplies
    that value once more by (1 + cos(pi e / T)) / (1 + cos(pi (e - 1) / T)); at e = 0 the
    chainable form returns the current lr, i.e. base_lr.
  So lr = base_lr * cos^4(pi e / 2T) / cos^2(pi (e - 1) / 2T) for e >= 1; it reaches 0 only when
  W = 0. (torch >= 2.8 drops the e = 0 special case: base_lr * 2 / (1 + cos(pi / T)) at that step.)

  Args:
    base_lr: peak learning rate (`config.optim.lr`).
    total_steps: T, the number of optimiser steps of the whole run.
    warmup_steps: W, `warmup_epochs * steps_per_epoch`.

  Returns:
    An optax schedule: step count -> learning rate (float32).
  """
  if total_steps <= 0 or warmup_steps < 0:
    raise errors.InputError(
        'warmup_cosine_schedule: need total_steps > 0 and warmup_steps >= 0, got '
        f'total_steps={total_steps}, warmup_steps={warmup_steps}')
  factor = base_lr / 1e3

  def schedule(count):
    c = jnp.asarray(count, jnp.int32) + 1
    warm = base_lr * (factor + (1.0 - factor) * c / max(warmup_steps, 1))
    e = jnp.clip(c - warmup_steps, 0, total_steps)
    now = _cos_half_squared(total_steps - e, total_steps)
    # At e == 0 the result is base_lr; `before` is still > 0 there (argument T + 1), so no NaN.
    before = _cos_half_squared(total_steps - e + 1, total_steps)
    cosine = jnp.where(e == 0, base_lr, base_lr * jnp.square(now) / before)
    return jnp.where(c < warmup_steps, warm, cosine).astype(jnp.float32)

  return schedule


def cosine_schedule(base_lr: float, total_steps: int) -> optax.Schedule:
  """torch `CosineAnnealingLR(T_max=T)` stepped per update: lr_k = base_lr (1 + cos(pi k/T)) / 2."""
  if total_steps <= 0:
    raise errors.InputError(f'cosine_schedule: need total_steps > 0, got {total_steps}')

  def schedule(count):
    k = jnp.clip(jnp.asarray(count, jnp.int32), 0, total_steps)
    return (base_lr * _cos_half_squared(total_steps - k, total_steps)).astype(jnp.float32)

  return schedule


def linear_warmup_cosine_schedule(base_lr: float, total_steps: int,
                                  warmup_steps: int) -> optax.Schedule:
  """lr_k = base_lr (k + 1) / W for k < W, then base_lr (1 + cos(pi (k - W) / (T - W))) / 2.

  The first step already trains (at base_lr / W, not 0), the peak is reached at step W - 1 or W,
  and the last step T - 1 is one cosine step above 0.
  """
  if total_steps <= warmup_steps or warmup_steps < 0:
    raise errors.InputError(
        'linear_warmup_cosine_schedule: need 0 <= warmup_steps < total_steps, got '
        f'total_steps={total_steps}, warmup_steps={warmup_steps}')
  decay_steps = total_steps - warmup_steps

  def schedule(count):
    k = jnp.asarray(count, jnp.int32)
    warm = base_lr * (k + 1) / max(warmup_steps, 1)
    e = jnp.clip(k - warmup_steps, 0, decay_steps)
    cosine = base_lr * _cos_half_squared(decay_steps - e, decay_steps)
    return jnp.where(k < warmup_steps, warm, cosine).astype(jnp.float32)

  return schedule


def ijepa_warmup_cosine_schedule(base_lr: float, total_steps: int, warmup_steps: int,
                                 start_lr: float, final_lr: float) -> optax.Schedule:
  """I-JEPA's `WarmupCosineSchedule` (src/utils/schedulers.py), stepped before every update.

  Update k (0-based) uses s = k + 1: s < W: start_lr + (s / W) (base_lr - start_lr); else
  final_lr + (base_lr - final_lr) (1 + cos(pi (s - W) / (T - W))) / 2, at least final_lr.
  """
  if total_steps <= warmup_steps or warmup_steps < 0:
    raise errors.InputError(
        'ijepa_warmup_cosine_schedule: need 0 <= warmup_steps < total_steps, got '
        f'total_steps={total_steps}, warmup_steps={warmup_steps}')

  def schedule(count):
    s = jnp.asarray(count, jnp.float32) + 1.0
    warm = start_lr + s / max(warmup_steps, 1) * (base_lr - start_lr)
    progress = (s - warmup_steps) / (total_steps - warmup_steps)
    cosine = final_lr + (base_lr - final_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(s < warmup_steps, warm, jnp.maximum(cosine, final_lr)).astype(jnp.float32)

  return schedule


def cosine_weight_decay_schedule(start: float, final: float, total_steps: int) -> optax.Schedule:
  """I-JEPA's `CosineWDSchedule`: update k uses wd = final + (start - final) (1 + cos(pi (k + 1)
  / T)) / 2, clamped at `final` (the code's cosine ramp; the paper says linear)."""

  def schedule(count):
    s = jnp.asarray(count, jnp.float32) + 1.0
    wd = final + (start - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * s / total_steps))
    return (jnp.minimum(wd, final) if final >= start else jnp.maximum(wd, final)
            ).astype(jnp.float32)

  return schedule


def make_schedule(optim_config: Mapping[str, Any], *, total_steps: int,
                  warmup_steps: int) -> optax.Schedule:
  """The schedule named by `optim_config['schedule']` (default 'warmup_cosine')."""
  name = optim_config.get('schedule', 'warmup_cosine')
  lr = float(optim_config['lr'])
  if name == 'warmup_cosine':
    return warmup_cosine_schedule(lr, total_steps, warmup_steps)
  if name in ('linear_warmup_cosine', 'ijepa_warmup_cosine') and warmup_steps >= total_steps:
    # (The original DualTrack schedule, 'warmup_cosine', warms up over the whole of a short run.)
    raise errors.InputError(
        f"config.optim.schedule='{name}' needs a warm-up shorter than the run: "
        f'config.warmup_epochs gives {warmup_steps} warm-up steps, the run has {total_steps} '
        '(config.total_steps or num_epochs); lower warmup_epochs')
  if name == 'linear_warmup_cosine':
    return linear_warmup_cosine_schedule(lr, total_steps, warmup_steps)
  if name == 'ijepa_warmup_cosine':
    missing = [k for k in ('start_lr', 'final_lr') if optim_config.get(k) is None]
    if missing:
      raise errors.InputError(f"config.optim.schedule='ijepa_warmup_cosine' needs "
                              f"config.optim.{' and '.join(missing)}")
    return ijepa_warmup_cosine_schedule(lr, total_steps, warmup_steps,
                                        float(optim_config['start_lr']),
                                        float(optim_config['final_lr']))
  if name not in SCHEDULES:
    raise errors.InputError(f"config.optim.schedule: unknown schedule '{name}'; expected one of "
                            f'{SCHEDULES}')
  if warmup_steps:
    raise errors.InputError(
        f"config.optim.schedule='{name}' has no warmup, but warmup_epochs gives "
        f'{warmup_steps} warmup steps; use warmup_cosine or warmup_epochs=0')
  if name == 'cosine':
    return cosine_schedule(lr, total_steps)
  return optax.constant_schedule(lr)


def param_path(path) -> str:
  """'/'-joined names of a pytree key path, e.g. 'encoder/Conv_0/kernel'."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    else:
      parts.append(str(key))
  return '/'.join(parts)


def _compile_patterns(patterns: Sequence[str], key: str) -> list[re.Pattern]:
  try:
    return [re.compile(p) for p in patterns]
  except re.error as e:
    raise errors.InputError(f'config.{key}: invalid regex {e.pattern!r}: {e}') from e


def _paths(params) -> list[str]:
  return [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _check_all_match(patterns: Sequence[re.Pattern], paths: Sequence[str], key: str) -> None:
  """Raises ValueError if a pattern fully matches no path (a typo would silently do nothing)."""
  for pattern in patterns:
    if not any(pattern.fullmatch(path) for path in paths):
      shown = ', '.join(paths[:20]) + (', ...' if len(paths) > 20 else '')
      raise errors.InputError(f'config.{key}: pattern {pattern.pattern!r} matches no parameter; '
                              f'parameter paths are: {shown}')


def path_mask(params, patterns: Sequence[str], key: str, *, check: bool = True):
  """A pytree of bools like `params`: True where a regex of `patterns` fully matches the path.

  Raises:
    ValueError: a pattern is not a valid regex or, with `check`, matches no parameter; the message
      names `config.<key>`. (No `check` for subsets of the parameters, e.g. inside optax.masked.)
  """
  compiled = _compile_patterns(patterns, key)
  if check:
    _check_all_match(compiled, _paths(params), key)
  return jax.tree_util.tree_map_with_path(
      lambda p, _: any(pattern.fullmatch(param_path(p)) for pattern in compiled), params)


def trainable_mask(params, frozen: Sequence[str] = ()):
  """A pytree of bools like `params`: False where a `frozen` regex fully matches the path.

  Raises:
    ValueError: a pattern is not a valid regex or matches no parameter (a typo would otherwise
      silently train everything).
  """
  return jax.tree.map(lambda frozen_leaf: not frozen_leaf, path_mask(params, frozen, 'frozen'))


def sparse_group_names(params, patterns: Sequence[str], *, check: bool = True):
  """A pytree like `params` of group names ('' for parameters in no group), see module docstring.

  The name is '<pattern index>:<first capture group>' of the first pattern that fully matches the
  path ('<pattern index>:' for a pattern without groups). `check`: as in `path_mask`.
  """
  compiled = _compile_patterns(patterns, 'optim.sparse_groups')
  if check:
    _check_all_match(compiled, _paths(params), 'optim.sparse_groups')

  def name(path, _):
    path = param_path(path)
    for i, pattern in enumerate(compiled):
      m = pattern.fullmatch(path)
      if m:
        return f'{i}:{m.group(1) if m.groups() else ""}'
    return ''

  return jax.tree_util.tree_map_with_path(name, params)


def _skip_if_unused(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner`, except that a step with all-zero gradients gives zero updates and keeps the state."""

  def update(updates, state, params=None):
    used = functools.reduce(jnp.logical_or, [jnp.any(u != 0) for u in jax.tree.leaves(updates)],
                            jnp.zeros((), bool))
    new_updates, new_state = inner.update(updates, state, params)
    new_updates = jax.tree.map(lambda u: jnp.where(used, u, jnp.zeros_like(u)), new_updates)
    return new_updates, jax.tree.map(lambda new, old: jnp.where(used, new, old), new_state, state)

  return optax.GradientTransformation(inner.init, update)


def _per_sparse_group(make_inner, patterns: Sequence[str]) -> optax.GradientTransformation:
  """One `_skip_if_unused(make_inner())` per sparse group, each with its own state."""

  def transforms(params):
    names = sorted({n for n in jax.tree.leaves(sparse_group_names(params, patterns, check=False))
                    if n})
    return {name: optax.masked(
        _skip_if_unused(make_inner()),
        functools.partial(lambda tree, name: jax.tree.map(
            lambda n: n == name, sparse_group_names(tree, patterns, check=False)), name=name))
            for name in names}

  def init(params):
    return {name: tx.init(params) for name, tx in transforms(params).items()}

  def update(updates, state, params=None):
    new_state = {}
    for name, tx in transforms(params).items():
      updates, new_state[name] = tx.update(updates, state[name], params)
    return updates, new_state

  return optax.GradientTransformation(init, update)


def layer_scales(params, rate: float, num_layers: int, rules: Sequence[Sequence[Any]], *,
                 check: bool = True):
  """A pytree like `params` of Python floats: rate ** (num_layers - layer_id - 1), module docstring.

  Raises:
    InputError: a rule is not a (regex, first id) pair, a regex is invalid or (with `check`)
      matches no parameter, or a layer id falls outside [0, num_layers); the message names the key.
  """
  key = 'optim.layer_ids'
  if not 0.0 < rate <= 1.0:
    raise errors.InputError(f'config.optim.layer_decay must be in (0, 1] (0 switches it off), '
                            f'got {rate}')
  if num_layers < 1:
    raise errors.InputError(f'config.optim.num_layers must be >= 1 with config.optim.layer_decay, '
                            f'got {num_layers}')
  for rule in rules:
    if (isinstance(rule, str) or len(rule) != 2 or not isinstance(rule[1], int)
        or isinstance(rule[1], bool)):
      raise errors.InputError(f'config.{key}: each rule is a (regex, first layer id) pair, got '
                              f'{rule!r}')
  compiled = _compile_patterns([r[0] for r in rules], key)
  if check:
    _check_all_match(compiled, _paths(params), key)

  def scale(path, _):
    path = param_path(path)
    layer = num_layers - 1
    for pattern, (_, first) in zip(compiled, rules):
      m = pattern.fullmatch(path)
      if m:
        layer = first + (int(m.group(1)) if m.groups() else 0)
        break
    if not 0 <= layer < num_layers:
      raise errors.InputError(f'config.{key}: {path} gets layer id {layer}, outside [0, '
                              f'config.optim.num_layers = {num_layers})')
    return float(rate) ** (num_layers - layer - 1)

  return jax.tree_util.tree_map_with_path(scale, params)


def _scale_by_layer(rate: float, num_layers: int,
                    rules: Sequence[Sequence[Any]]) -> optax.GradientTransformation:
  """Multiplies each update by its `layer_scales` factor (computed from the paths; no state)."""

  def update(updates, state, params=None):
    del params
    scales = layer_scales(updates, rate, num_layers, rules, check=False)
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def masked_global_norm(tree, mask) -> jax.Array:
  """Global L2 norm over the leaves of `tree` whose `mask` entry is True."""
  leaves = [x for x, keep in zip(jax.tree.leaves(tree), jax.tree.leaves(mask)) if keep]
  return jnp.sqrt(sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves),
                      jnp.zeros((), jnp.float32)))


def make_optimizer(optim_config: Mapping[str, Any], *, total_steps: int, warmup_steps: int,
                   frozen: Sequence[str] = ()
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (torch defaults) + schedule + optional global-norm clipping, with frozen subtrees.

  Args:
    optim_config: `config.optim` with keys lr, weight_decay (0), b1 (0.9), b2 (0.999),
      eps (1e-8), grad_clip_norm (None = no clipping), schedule ('warmup_cosine'), no_decay
      (regexes of parameters without weight decay), sparse_groups (regexes with a capture group:
      groups that an unused step leaves untouched; module docstring), layer_decay (0: off),
      num_layers and layer_ids (the layer-wise learning-rate decay; module docstring).
    total_steps: number of optimiser steps of the run.
    warmup_steps: warmup length in steps.
    frozen: regexes of parameter paths that must not change.

  Returns:
    (transformation, schedule); the schedule maps the step count to the learning rate.
  """
  if 'lr' not in optim_config:
    raise errors.InputError('config.optim.lr is required')
  schedule = make_schedule(optim_config, total_steps=total_steps, warmup_steps=warmup_steps)
  b1, b2 = float(optim_config.get('b1', 0.9)), float(optim_config.get('b2', 0.999))
  eps = float(optim_config.get('eps', 1e-8))
  weight_decay = float(optim_config.get('weight_decay', 0.0))
  final_wd = optim_config.get('final_weight_decay', None)
  if final_wd is not None:  # optax's adamw and add_decayed_weights take a schedule.
    weight_decay = cosine_weight_decay_schedule(weight_decay, float(final_wd), total_steps)
  no_decay = tuple(optim_config.get('no_decay', ()) or ())
  sparse = tuple(optim_config.get('sparse_groups', ()) or ())
  frozen = tuple(frozen)

  def decay_mask(params):
    # Called on each label's part of the parameters: the patterns are checked in `labels`.
    return jax.tree.map(lambda skip: not skip,
                        path_mask(params, no_decay, 'optim.no_decay', check=False))

  adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                      mask=decay_mask if no_decay else None)
  transforms = {TRAINABLE: adamw, FROZEN: optax.set_to_zero()}
  if sparse:
    # The Adam step and the decay per group; the learning rate is applied with the global count.
    transforms[SPARSE] = optax.chain(
        _per_sparse_group(lambda: optax.chain(
            optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
            optax.add_decayed_weights(weight_decay, decay_mask if no_decay else None)), sparse),
        optax.scale_by_learning_rate(schedule))

  rate = float(optim_config.get('layer_decay', 0.0) or 0.0)
  rules = tuple(tuple(r) if isinstance(r, (list, tuple)) else r
                for r in optim_config.get('layer_ids', ()) or ())
  num_layers = int(optim_config.get('num_layers', 0) or 0)

  def labels(params):
    path_mask(params, no_decay, 'optim.no_decay')  # Every pattern must match a parameter.
    if rate:
      layer_scales(params, rate, num_layers, rules)  # Every rule must match and fit.
    groups = (sparse_group_names(params, sparse) if sparse
              else jax.tree.map(lambda _: '', params))
    return jax.tree.map(lambda keep, group: (FROZEN if not keep else SPARSE if group
                                             else TRAINABLE),
                        trainable_mask(params, frozen), groups)

  tx = optax.multi_transform(transforms, labels)
  if rate:
    tx = optax.chain(tx, _scale_by_layer(rate, num_layers, rules))
  clip = optim_config.get('grad_clip_norm', None)
  if clip:
    # One norm over every trainable gradient (frozen ones excluded; unused sparse groups add 0).
    # optax scales by max_norm / norm when norm > max_norm; torch's clip_grad_norm_ by
    # max_norm / (norm + 1e-6): a relative difference of 1e-6 / norm, far below float32 noise.
    tx = optax.chain(optax.masked(optax.clip_by_global_norm(float(clip)),
                                  lambda params: trainable_mask(params, frozen)), tx)
  return tx, schedule
