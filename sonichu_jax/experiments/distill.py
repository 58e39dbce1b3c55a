"""SONICHU stage 3: a teacher ensemble distilled into one keypoint model (docs/distillation.md).

The student is the keypoint experiment's model (`keypoints.Experiment`, whose forward, data,
optimiser groups, evaluation and export it reuses); its loss is the card's

  loss = loss_real + teachers.weight * loss_teacher      (weight 0.5 in the card)

- loss_real: the keypoint experiment's loss on the batch's labels, masked by `visible` (missing
  keypoints, including FM_UIA's (0, 0) fill, carry no loss);
- loss_teacher: the same coordinate loss (`config.loss`) towards the coordinate-wise median of
  the teachers' keypoints, on every real row and every keypoint of the task (the teachers label
  what the ground truth leaves out).

The teachers run ONLINE inside the jitted step on the very batch the student sees (after its
augmentation): Beyer et al.'s "consistent teaching" (training_and_export_notes.md, section 3.2):
cached labels would disagree with the augmented view. They are K members of one architecture,
stacked on a leading axis and run as one vmapped program in inference mode (BatchNorm running
statistics, no stochastic depth) in `teachers.compute_dtype` (`sonichu_jax.ensemble`).

Teachers are not part of the train state: the experiment holds them and hands them to the
trainer as `step_constants()` {'teachers': stacked variables}, which the jitted step receives as an
argument (replicated over the mesh) and `loss_fn` finds in its `variables`. So they get no gradient
and no optimiser state, and the student's checkpoints hold the student alone. (Closing over them
instead would embed them in the compiled program as constants.) Resume restores the student as
for any run and reloads the teachers from their paths. Which teachers a run used is recorded in its
config (saved with every checkpoint): `teachers.step_dirs` and `teachers.sha256` (each teacher's
variables hash, `ensemble.variables_hash`). A teacher whose weights changed between a run's start
and its resume is a loud warning, not an error (the trainer's config diff names
`teachers.sha256`): a teacher retrained on purpose should not cost a restart of 100 epochs, and
every checkpoint's config shows which teachers it saw.

Bad input fails before any step and before the dataset is read: no teachers, a missing teacher
checkpoint, a teacher of another architecture (any `config.model` key but NON_ARCHITECTURE_KEYS)
or without one of the student's tasks; each error names the file and the config key.

Evaluation: the student's metrics as the keypoint experiment's, plus (`teachers.eval_median`) the
teachers' coordinate-wise median and each teacher on the same validation records, computed once
and cached: `teachers/median/<metric>` and `teachers/<i>/mre/{weighted,unweighted}`.
"""
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sonichu_jax import ensemble
from sonichu_jax import tasks
from sonichu_jax.experiments import keypoints
from ultrasound_common import checkpoints
from ultrasound_common import errors

# config.model keys that may differ between teachers and student (or be absent from older runs'
# configs): a training-only regulariser and implementation choices that compute the same function.
NON_ARCHITECTURE_KEYS = ('drop_path_rate', 'attention_implementation', 'deconv_implementation')
_NUM_KEYPOINTS = np.array([t.num_keypoints for t in tasks.TASKS], np.int32)
MEMBER_METRICS = ('mre/weighted', 'mre/unweighted')
TEACHERS = 'teachers'  # The step constants' collection.


def _teacher_step_dir(path: str, checkpoint: str) -> str:
  try:
    directory, step = checkpoints.find_step(path, checkpoint)
  except errors.MissingFileError as e:
    raise errors.MissingFileError(f'config.teachers.workdirs: {e}') from e
  return os.path.join(directory, str(step))


def check_teacher(step_dir: str, teacher: dict[str, Any],
                  student: ml_collections.ConfigDict) -> None:
  """InputError naming `step_dir` and the key if the teacher cannot teach the student.

  Args:
    step_dir: the teacher's checkpoint step directory.
    teacher: its saved config (JSON dict).
    student: the distillation run's config.
  """
  if 'model' not in teacher:
    raise errors.InputError(
        f'config.teachers.workdirs: {step_dir} is not a SONICHU keypoint run (its config has no '
        f'"model"; config.experiment {teacher.get("experiment")!r})')
  wanted = student.model.to_dict()
  for key in sorted(set(wanted) | set(teacher['model'])):
    if key in NON_ARCHITECTURE_KEYS:
      continue
    if teacher['model'].get(key) != wanted.get(key):
      raise errors.InputError(
          f'config.teachers.workdirs: {step_dir} has config.model.{key} = '
          f'{teacher["model"].get(key)!r}, but the student has {wanted.get(key)!r}; the card\'s '
          'student has its teachers\' architecture')
  missing = sorted(set(ensemble.task_set(student)) - set(ensemble.task_set(teacher)))
  if missing:
    raise errors.InputError(
        f'config.teachers.workdirs: {step_dir} was trained on config.data.tasks '
        f'{list(ensemble.task_set(teacher))}, without the student\'s tasks {missing}')


def load_teachers(config: ml_collections.ConfigDict) -> ensemble.Members:
  """The checked teachers of `config.teachers`, recorded into it (module docstring).

  Every teacher's config is read and checked against the student before any weights load.
  """
  spec = config.teachers
  paths = tuple(spec.workdirs or ())
  if not paths:
    raise errors.InputError('config.teachers.workdirs is empty: give the run folders (or '
                            'checkpoint step directories) of the teachers to distill')
  step_dirs = [_teacher_step_dir(p, str(spec.checkpoint)) for p in paths]
  for step_dir in step_dirs:
    check_teacher(step_dir, checkpoints.read_config(step_dir), config)
  try:
    members = ensemble.load_members(step_dirs, dtype=spec.compute_dtype)
  except ensemble.MemberError as e:
    raise errors.InputError(f'config.teachers.workdirs: {e}') from e
  recorded = tuple(spec.sha256 or ())
  if recorded and recorded != members.hashes:
    logging.warning(
        'config.teachers.sha256: the teachers changed since this config was recorded '
        '(%s -> %s for %s); the teacher targets and metrics now come from the new weights.',
        list(recorded), list(members.hashes), list(members.paths))
  # The trainer saves the config after building the experiment: each checkpoint records these.
  spec.step_dirs = members.paths
  spec.sha256 = members.hashes
  logging.info('%d teachers in %s: %s', members.size, members.config.compute_dtype,
               ', '.join(f'{p} (sha256 {h[:12]})' for p, h in zip(members.paths, members.hashes)))
  return members


class Experiment(keypoints.Experiment):
  """Keypoint training of a student from labels and the teachers' median; see the module doc."""

  def __init__(self, config: ml_collections.ConfigDict, *, load_data: bool = True):
    """As `keypoints.Experiment`; with data (training, evaluation) also the teachers, first."""
    # Prediction and export need the student only; its teachers may be long gone.
    self.teachers = load_teachers(config) if load_data else None
    super().__init__(config, load_data=load_data)
    self._teacher_metrics = None

  def step_constants(self) -> dict[str, Any]:
    """{'teachers': the teachers' stacked variables}, which the trainer passes to `loss_fn`."""
    if self.teachers is None:
      raise errors.InputError('distill.Experiment(load_data=False) has no teachers')
    return {TEACHERS: self.teachers.variables}

  def teacher_targets(self, variables, batch: dict[str, jax.Array]
                      ) -> tuple[jax.Array, jax.Array]:
    """The teachers' keypoints of `batch` (traceable): (K, B, 22, 2) and their median.

    Args:
      variables: `loss_fn`'s variables, with the step constants ('teachers').
      batch: a training batch of one task.
    """
    preds = ensemble.member_predictions(self.teachers.experiment, variables[TEACHERS],
                                        batch['image'], batch['task'][0],
                                        tta=bool(self.config.teachers.tta))
    return preds, ensemble.median(preds)

  def loss_fn(self, variables, batch, rng):
    real, step_metrics, stats, pred = self.supervised_terms(variables, batch, rng)
    _, target = self.teacher_targets(variables, batch)
    num_keypoints = jnp.asarray(_NUM_KEYPOINTS)[batch['task'][0]]
    every_keypoint = (jnp.arange(keypoints.MAX_KEYPOINTS) < num_keypoints).astype(jnp.float32)
    mask = batch['weight'][:, None] * every_keypoint[None]
    teacher = keypoints.keypoint_loss(pred, target, mask, batch['image_hw'], self.config.loss)
    loss = real + float(self.config.teachers.weight) * teacher
    scale = batch['image_hw'][:, None, ::-1].astype(jnp.float32)
    visible = batch['visible'].astype(jnp.float32) * batch['weight'][:, None]
    median_err = jnp.linalg.norm((target - batch['keypoints']) * scale, axis=-1)
    student_err = jnp.linalg.norm((pred.astype(jnp.float32) - target) * scale, axis=-1)
    step_metrics = {
        **step_metrics, 'loss_real': real, 'loss_teacher': teacher,
        # The target's own error on the labelled keypoints, and the student's distance to it.
        'teacher_median_mre_px': jnp.sum(median_err * visible) / jnp.maximum(jnp.sum(visible), 1),
        'student_to_median_px': jnp.sum(student_err * mask) / jnp.maximum(jnp.sum(mask), 1)}
    return loss, (step_metrics, {'batch_stats': stats})

  def teacher_metrics(self) -> dict[str, float]:
    """The teachers' median's and each teacher's validation metrics (computed once)."""
    if self._teacher_metrics is None:
      per_member, combined = ensemble.evaluate_records(
          self.teachers, self.val_records, batch_size=int(self.config.eval_batch_size),
          tta=bool(self.config.eval_tta))
      out = {f'teachers/median/{k}': v for k, v in combined.items()}
      for i, member in enumerate(per_member):
        out.update({f'teachers/{i}/{k}': member[k] for k in MEMBER_METRICS})
      self._teacher_metrics = out
    return self._teacher_metrics

  def evaluate(self, variables) -> keypoints.EvalResult:
    result = super().evaluate(variables)
    if self.config.teachers.eval_median:
      result.metrics.update(self.teacher_metrics())
    return result
