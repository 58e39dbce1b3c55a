r"""SONICHU stage 3: the student distilled from the teachers' median (docs/distillation.md).

The card: "each batch runs all five teachers, their coordinate-wise median becomes the teacher
target; loss_real + 0.5 * loss_teacher; 100 epochs, AdamW, cosine schedule with 3-epoch warm-up";
the student has the teachers' architecture. Everything else is keypoints_from_ijepa.py's recipe
(keypoints.py's optimiser, augmentation and schedule; the backbone starts as the pretraining run's
target encoder through `init_from.ijepa`, the heads afresh), whose `:sim` variant this follows.

  python -m launch.train --config=configs/sonichu/distill.py --workdir=workdirs/student \
      --config.data.dataset=/data/fm_uia --config.init_from.ijepa.workdir=workdirs/ijepa \
      --config.data.pseudo_labels="('workdirs/pseudo/round3',)" \
      --config.teachers.workdirs="('workdirs/r1','workdirs/r2','workdirs/r3','workdirs/selective',\
'workdirs/balanced')"
  python -m launch.evaluate --workdir=workdirs/student

On synthetic data (`:sim`), after pretrain_ijepa.py:sim and the teachers of teacher.py at :sim
(docs/teachers.md; T: their five run folders, as above):

  python -m launch.train --config=configs/sonichu/distill.py:sim --workdir=workdirs/student_sim \
      --config.init_from.ijepa.workdir=workdirs/ijepa_sim \
      --config.data.pseudo_labels="('workdirs/pseudo_sim/round3',)" --config.teachers.workdirs="T"

`teachers.step_dirs` and `teachers.sha256` are written by the run (the checkpoints each teacher
was read from and the SHA-256 of its variables); leave them empty.
"""
import os

import ml_collections as mlc

from launch import config_utils


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """keypoints_from_ijepa.py's config for `arg` ('sim' or none) with the teachers' keys."""
  c = config_utils.load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), 'keypoints_from_ijepa.py')
      + (f':{arg}' if arg else ''))
  c.experiment = 'sonichu_jax.experiments.distill'
  # Folders of `python -m sonichu_jax.pseudo_label` whose records join the training records (the
  # card's student trains on "labelled + pseudo-labelled samples"; validation stays on labels).
  c.data.pseudo_labels = ()
  c.teachers = mlc.ConfigDict()
  # Run folders (their best checkpoint, else the latest) or checkpoint step directories; the
  # card's five: one per pseudo-label regime (R1, R2, R3, selective, balanced).
  c.teachers.workdirs = ()
  c.teachers.checkpoint = 'best'  # For run folders: 'best', 'latest' or a step number.
  # Teachers in bf16 (inference only: half the memory and about half the time on accelerators).
  c.teachers.compute_dtype = 'bfloat16'
  c.teachers.weight = 0.5  # The card's loss_real + 0.5 * loss_teacher.
  c.teachers.tta = False  # Flip TTA for the targets would double the teachers' cost (unpublished).
  c.teachers.eval_median = True  # Also report the teachers' median on the validation set (once).
  c.teachers.step_dirs = ()  # Written by the run.
  c.teachers.sha256 = ()  # Written by the run.
  if arg == 'sim':
    c.teachers.compute_dtype = 'float32'  # The :sim runs compute in float32 on CPU.
  return c
