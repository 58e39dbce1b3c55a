r"""SONICHU's five teachers (stage 2): keypoint models trained with five pseudo-label regimes.

The card names the regimes (R1, R2, R3, selective/FUGC-capped, r3capped/balanced) without
defining them; the definitions below are ours (docs/teachers.md). Every teacher is the recipe of
keypoints_from_ijepa.py (the keypoint model, backbone from the I-JEPA run's target encoder,
`--config.init_from.ijepa.workdir`), trained on the labelled training records plus one folder of
pseudo-labels (`data.pseudo_labels`, written by `python -m sonichu_jax.pseudo_label`) and validated
on original labels only (the card's "fair validation"). Each has its own seed, so that even equal
data gives different teachers. Rounds: round 0 is the supervised model T0
(keypoints_from_ijepa.py); round n's pseudo-labels come from the median of the teachers of the
earlier rounds, and replace (not add to) the earlier rounds' labels.

| regime      | labelled by (median of) | confidence filter      | per-task caps     | sampling |
|-------------|-------------------------|------------------------|-------------------|----------|
| `r1`        | T0 (one model)          | none (no spread)       | none              | per image|
| `r2`        | T0, R1                  | spread <= MAX_SPREAD   | none              | per image|
| `r3`        | T0, R1, R2              | spread <= MAX_SPREAD   | none              | per image|
| `selective` | T0, R1, R2              | spread <= MAX_SPREAD/2 | FUGC <= FUGC_CAP  | per image|
| `balanced`  | T0, R1, R2              | spread <= MAX_SPREAD   | every task <= CAP | per task |

- Spread (`sonichu_jax.ensemble.spread`): per keypoint the mean distance in image pixels from each
  labeller to the median; an image's is its largest. On FM_UIA: MAX_SPREAD 8 px (about 1 % of a
  typical frame's width, near the card's best per-task MRE), FUGC_CAP 500, CAP 2000; on the
  synthetic images (`:sim`): 6 px, 16 and 32 (of a pool of 64 images per task).
- Selective: only the most certain labels, and FUGC (whose real labels give the card's best task,
  3.9 px) gets few pseudo-labels so that they cannot outweigh its real ones.
- Sampling (`data.task_exponent`): "per image" draws tasks in proportion to their records (1.0:
  every labelled or pseudo-labelled image equally often, as one concatenated dataset); "per task"
  draws tasks uniformly (0.0, the FM_UIA baseline's sampler), so that caps plus uniform tasks keep
  the large tasks' pseudo-labels from dominating.

The whole stage on FM_UIA (POOL: unlabelled images, a subfolder per task or an FM_UIA split):

  python -m launch.train --config=configs/sonichu/keypoints_from_ijepa.py \
      --config.init_from.ijepa.workdir=workdirs/ijepa --workdir=workdirs/t0
  python -m sonichu_jax.pseudo_label --teachers=workdirs/t0 --images=POOL \
      --out=workdirs/pseudo/round1
  python -m launch.train --config=configs/sonichu/teacher.py:r1 \
      --config.init_from.ijepa.workdir=workdirs/ijepa --workdir=workdirs/r1
  python -m sonichu_jax.pseudo_label --teachers=workdirs/t0 --teachers=workdirs/r1 \
      --images=POOL --max_spread=8 --out=workdirs/pseudo/round2
  python -m launch.train --config=configs/sonichu/teacher.py:r2 ... --workdir=workdirs/r2
  python -m sonichu_jax.pseudo_label --teachers=workdirs/t0 --teachers=workdirs/r1 \
      --teachers=workdirs/r2 --images=POOL --max_spread=8 --out=workdirs/pseudo/round3
  python -m sonichu_jax.pseudo_label ... (the same three teachers) --max_spread=4 \
      --cap=FUGC=500 --out=workdirs/pseudo/round3_selective
  python -m sonichu_jax.pseudo_label ... (the same three teachers) --max_spread=8 \
      --cap=AOP=2000 --cap=FUGC=2000 ... (each task) --out=workdirs/pseudo/round3_balanced
  python -m launch.train --config=configs/sonichu/teacher.py:r3 ... --workdir=workdirs/r3
  python -m launch.train --config=configs/sonichu/teacher.py:selective ... --workdir=...
  python -m launch.train --config=configs/sonichu/teacher.py:balanced ... --workdir=...
  python -m launch.evaluate --workdir=workdirs/r1 ... --workdir=workdirs/balanced --ensemble

`:sim` after the regime (`teacher.py:r1:sim`) is the same on keypoints_from_ijepa.py:sim, with the
folders under workdirs/pseudo_sim/ and an unlabelled pool of synthetic images (their labels are
never read): `python -m sonichu_jax.data.synthetic --out=workdirs/sim_pool --num_train=64
--num_val=1 --seed=1`, then `--images=workdirs/sim_pool/train` (docs/teachers.md lists every
command). `data.pseudo_labels` can be set to other folders.
"""
import os

import ml_collections as mlc

from launch import config_utils

# regime -> (seed, pseudo-label folder, data.task_exponent).
REGIMES = {
    'r1': (1, 'round1', 1.0),
    'r2': (2, 'round2', 1.0),
    'r3': (3, 'round3', 1.0),
    'selective': (4, 'round3_selective', 1.0),
    'balanced': (5, 'round3_balanced', 0.0),
}


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The teacher of regime `arg` ('r1', 'r2', 'r3', 'selective', 'balanced', each with ':sim')."""
  regime, _, variant = (arg or '').partition(':')
  if regime not in REGIMES or variant not in ('', 'sim'):
    raise ValueError(f'configs/sonichu/teacher.py: unknown variant {arg!r}; use one of '
                     f'{", ".join(REGIMES)}, optionally followed by ":sim"')
  c = config_utils.load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), 'keypoints_from_ijepa.py')
      + (f':{variant}' if variant else ''))
  seed, folder, task_exponent = REGIMES[regime]
  c.seed = seed
  c.data.task_exponent = task_exponent
  c.data.pseudo_labels = (os.path.join('workdirs', 'pseudo_sim' if variant else 'pseudo', folder),)
  return c
