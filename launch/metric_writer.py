"""TensorBoard and console output of a run (process 0 only writes; the others stay silent)."""
from collections.abc import Mapping
import logging as std_logging
import os
import re
import time

from absl import logging
import numpy as np

_ILLEGAL_TAG_CHARACTERS = re.compile(r'[^-/\w\.]')


def tag(name: str) -> str:
  """A TensorBoard tag for a metric or figure name: characters TensorBoard does not allow in
  names (e.g. the '@' of 'sdr@10px') become '_', as tensorboardX would do with a warning."""
  return _ILLEGAL_TAG_CHARACTERS.sub('_', name).lstrip('/')


class MetricWriter:
  """Scalars, images and text to TensorBoard event files in `<workdir>/tensorboard`."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self._writer = None
    if enabled:
      # Imported here: tensorboardX is only needed by the process that writes.
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(logdir=os.path.join(workdir, 'tensorboard'))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._writer is not None:
      for name, value in values.items():
        self._writer.add_scalar(tag(name), float(value), global_step=step)

  def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Each image is (H, W, 3) uint8."""
    if self._writer is not None:
      for name, image in images.items():
        self._writer.add_image(tag(name), image, global_step=step, dataformats='HWC')

  def text(self, step: int, name: str, text: str) -> None:
    if self._writer is not None:
      self._writer.add_text(tag(name), text, global_step=step)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def format_table(metrics: Mapping[str, float]) -> str:
  """Two aligned columns: metric name, value."""
  width = max((len(k) for k in metrics), default=6)
  lines = [f'{"metric":<{width}}  value', f'{"-" * width}  ------------']
  lines += [f'{k:<{width}}  {v:.6g}' for k, v in sorted(metrics.items())]
  return '\n'.join(lines)


def format_duration(seconds: float) -> str:
  """3725 -> '1:02:05'."""
  if not np.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


class Progress:
  """Steps per second between log points and the estimated time to the last step."""

  def __init__(self, first_step: int, total_steps: int):
    self.total_steps = total_steps
    self._step, self._time = first_step, time.monotonic()

  def update(self, step: int) -> tuple[float, float]:
    """(steps/s since the previous call, ETA in seconds) at `step` steps done."""
    now = time.monotonic()
    rate = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    eta = (self.total_steps - step) / rate if rate > 0 else float('inf')
    return rate, eta


def log_train_line(step: int, total_steps: int, metrics: Mapping[str, float], rate: float,
                   eta: float) -> None:
  """One console line: step, loss, the other metrics, steps/s and ETA."""
  others = ', '.join(f'{k} {v:.4g}' for k, v in sorted(metrics.items()) if k != 'loss')
  logging.info('step %d/%d | loss %.6g | %s | %.2f steps/s | ETA %s', step, total_steps,
               metrics['loss'], others, rate, format_duration(eta))


# Library messages that say nothing a user can act on: Orbax's notes on opening a checkpoint
# read-only (every evaluation and prediction does), and jax's note that this machine has no TPU.
_UNACTIONABLE = ('read_only=True, setting save_interval_steps', 'Given directory is read only',
                 "Unable to initialize backend 'tpu'")


class _DropLibraryChatter(std_logging.Filter):
  """Drops Orbax's INFO/DEBUG records (per-save chatter that would bury the progress lines) and
  the `_UNACTIONABLE` messages; Orbax's other warnings and every error stay."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if '/orbax/' in record.pathname and record.levelno < std_logging.WARNING:
      return False
    message = record.getMessage()
    return not any(text in message for text in _UNACTIONABLE)


def quiet_library_logs() -> None:
  """Keeps library warnings and errors that matter on the console, and nothing else of theirs."""
  logging.get_absl_handler().addFilter(_DropLibraryChatter())
