"""The nine SONICHU biometry tasks: names, keypoint counts, flip pairs and measurements.

This table is the single definition of the tasks; the model (one head per task), the data loaders,
the augmentations and the metrics all read it. Names, order and keypoint counts are those of the
SONICHU model card (sum of K = 60).

Flip pairs say which keypoints exchange identity under a horizontal mirror of the image (used by the
flip augmentation and by flip test-time augmentation). The card does not publish them, so they are
our convention (docs/sonichu.md, section "Tasks and keypoints"), chosen from what they mean:

- Keypoints with an anatomical identity keep it under a mirror (the femur's proximal and distal
  ends, the cervix's internal and external os, the symphysis ends and the head tangent point of AOP,
  the IVC walls, the cardiac landmarks): no pairs.
- The HC and FA keypoints are the two ends of two diameters (HC: OFD ends 0, 1 and BPD ends 2, 3;
  FA: TAD ends 0, 1 and APAD ends 2, 3). Their ends have no anatomical identity (HC18's are
  ellipse-fit points, and the multi-centre fetal biometry benchmark scores its diameters
  direction-invariantly, the minimum over the two endpoint assignments), so we order each
  diameter's ends image-left first; a mirror then swaps both pairs. Data writers must follow this
  order.

The measurement kind tells the metrics which clinical quantity the keypoints define:
`length` is the distance between keypoints 0 and 1; `ellipse` the perimeter of the ellipse with the
two diameters (0, 1) and (2, 3); `angle` the angle of progression; `pair_lengths` the distances of
the consecutive pairs (0, 1), (2, 3), ... (2 for PSAX, 8 for A4C, 11 for PLAX).
"""

import dataclasses

from ultrasound_common import errors

MEASUREMENT_KINDS = ('length', 'ellipse', 'angle', 'pair_lengths')


@dataclasses.dataclass(frozen=True)
class Task:
  """One biometry task.

  Attributes:
    name: the task name as on the model card, e.g. 'HC'.
    num_keypoints: K, the number of keypoints (heatmap channels of the task's head).
    flip_pairs: pairs (a, b) of keypoint indices that swap under a horizontal flip.
    measurement: one of MEASUREMENT_KINDS.
    description: what is measured.
  """
  name: str
  num_keypoints: int
  flip_pairs: tuple[tuple[int, int], ...]
  measurement: str
  description: str

  def flip_permutation(self) -> tuple[int, ...]:
    """Permutation p with flipped[k] = original[p[k]] for the keypoints of a mirrored image."""
    perm = list(range(self.num_keypoints))
    for a, b in self.flip_pairs:
      perm[a], perm[b] = b, a
    return tuple(perm)


TASKS: tuple[Task, ...] = (
    Task('AOP', 4, (), 'angle', 'angle of progression (intrapartum)'),
    Task('FUGC', 2, (), 'length', 'cervical length (transvaginal)'),
    Task('FA', 4, ((0, 1), (2, 3)), 'ellipse',
         'foetal abdomen: TAD and APAD, abdominal circumference'),
    Task('HC', 4, ((0, 1), (2, 3)), 'ellipse', 'foetal head: OFD and BPD, head circumference'),
    Task('IVC', 2, (), 'length', 'inferior vena cava diameter'),
    Task('PLAX', 22, (), 'pair_lengths', 'cardiac parasternal long axis: 11 dimensions'),
    Task('PSAX', 4, (), 'pair_lengths', 'cardiac parasternal short axis: RVOT and PA'),
    Task('A4C', 16, (), 'pair_lengths', 'apical four-chamber: 8 chamber dimensions'),
    Task('fetal_femur', 2, (), 'length', 'foetal femur length'),
)

TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)
_BY_NAME = {t.name: t for t in TASKS}


def get_task(name: str) -> Task:
  """Returns the task called `name`; raises ValueError listing the valid names if there is none."""
  try:
    return _BY_NAME[name]
  except (KeyError, TypeError):
    raise errors.InputError(
        f'Unknown SONICHU task {name!r}; valid tasks: {", ".join(TASK_NAMES)}.') from None

