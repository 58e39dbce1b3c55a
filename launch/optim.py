"""Optimiser of every stage: torch-equivalent AdamW, the original LR schedule, frozen subtrees.

AdamW: `optax.adamw` computes `p <- p - lr_t * (adam_update + wd * p)`, which is exactly
torch.optim.AdamW's decoupled decay `p <- p * (1 - lr_t * wd)` followed by
`p <- p - lr_t * adam_update` (the decay is scaled by the scheduled learning rate in both), with the
same bias corrections and `eps` outside the square root.

Schedules, stepped once per optimiser update like the original's `scheduler.step()` after every
`optimizer.step()`:
- 'warmup_cosine' (the original's default: `src/optimizer/optimizer.py::WarmupScheduler` around
  `CosineAnnealingLR(T_max=total_steps)`), reproduced with its quirks, see `warmup_cosine_schedule`;
- 'cosine': a plain per-step `CosineAnnealingLR(T_max=total_steps)`;
- 'constant'.

Frozen parameters (regexes over '/'-joined parameter paths, `re.fullmatch`) get `optax.set_to_zero`
through `optax.multi_transform`: no update, no weight decay, no Adam moments, and they do not count
in the gradient norm that is clipped or logged (in the original they have no `.grad`).
"""
from collections.abc import Mapping, Sequence
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

TRAINABLE, FROZEN = 'trainable', 'frozen'
SCHEDULES = ('warmup_cosine', 'cosine', 'constant')


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
    raise ValueError('warmup_cosine_schedule: need total_steps > 0 and warmup_steps >= 0, got '
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
    raise ValueError(f'cosine_schedule: need total_steps > 0, got {total_steps}')

  def schedule(count):
    k = jnp.clip(jnp.asarray(count, jnp.int32), 0, total_steps)
    return (base_lr * _cos_half_squared(total_steps - k, total_steps)).astype(jnp.float32)

  return schedule


def make_schedule(optim_config: Mapping[str, Any], *, total_steps: int,
                  warmup_steps: int) -> optax.Schedule:
  """The schedule named by `optim_config['schedule']` (default 'warmup_cosine')."""
  name = optim_config.get('schedule', 'warmup_cosine')
  lr = float(optim_config['lr'])
  if name == 'warmup_cosine':
    return warmup_cosine_schedule(lr, total_steps, warmup_steps)
  if name not in SCHEDULES:
    raise ValueError(f"config.optim.schedule: unknown schedule '{name}'; expected one of "
                     f'{SCHEDULES}')
  if warmup_steps:
    raise ValueError(f"config.optim.schedule='{name}' has no warmup, but warmup_epochs gives "
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


def trainable_mask(params, frozen: Sequence[str] = ()):
  """A pytree of bools like `params`: False where a `frozen` regex fully matches the path.

  Raises:
    ValueError: a pattern is not a valid regex or matches no parameter (a typo would otherwise
      silently train everything).
  """
  try:
    patterns = [re.compile(p) for p in frozen]
  except re.error as e:
    raise ValueError(f'config.frozen: invalid regex {e.pattern!r}: {e}') from e
  paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for pattern in patterns:
    if not any(pattern.fullmatch(path) for path in paths):
      shown = ', '.join(paths[:20]) + (', ...' if len(paths) > 20 else '')
      raise ValueError(f'config.frozen: pattern {pattern.pattern!r} matches no parameter; '
                       f'parameter paths are: {shown}')
  return jax.tree_util.tree_map_with_path(
      lambda p, _: not any(pattern.fullmatch(param_path(p)) for pattern in patterns), params)


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
      eps (1e-8), grad_clip_norm (None = no clipping), schedule ('warmup_cosine').
    total_steps: number of optimiser steps of the run.
    warmup_steps: warmup length in steps.
    frozen: regexes of parameter paths that must not change.

  Returns:
    (transformation, schedule); the schedule maps the step count to the learning rate.
  """
  if 'lr' not in optim_config:
    raise ValueError('config.optim.lr is required')
  schedule = make_schedule(optim_config, total_steps=total_steps, warmup_steps=warmup_steps)
  adamw = optax.adamw(schedule,
                      b1=float(optim_config.get('b1', 0.9)),
                      b2=float(optim_config.get('b2', 0.999)),
                      eps=float(optim_config.get('eps', 1e-8)),
                      weight_decay=float(optim_config.get('weight_decay', 0.0)))
  clip = optim_config.get('grad_clip_norm', None)
  # optax scales by max_norm / norm when norm > max_norm; torch's clip_grad_norm_ by
  # max_norm / (norm + 1e-6): a relative difference of 1e-6 / norm, far below float32 noise.
  trainable = optax.chain(optax.clip_by_global_norm(float(clip)), adamw) if clip else adamw
  frozen = tuple(frozen)

  def labels(params):
    return jax.tree.map(lambda keep: TRAINABLE if keep else FROZEN,
                        trainable_mask(params, frozen))

  tx = optax.multi_transform({TRAINABLE: trainable, FROZEN: optax.set_to_zero()}, labels)
  return tx, schedule
