"""Converts raw TUS-REC challenge scans into DualTrack sweep files and a sweep CSV.

Usage:
  python -m dualtrack_jax.data.tusrec --data_dir=RAW --out=DIR [--data_dir=RAW2 ...]
      [--calibration=RAW/calib_matrix.csv] [--split=train|val|test] [--register_as=NAME]
  python -m dualtrack_jax.data.tusrec --input_csv=scans.csv --out=DIR

Inputs (the challenge's files: docs/tusrec.md, sections "Data layout", "HDF5 datasets" and
"Calibration"): a challenge folder, either the training layout `frames_transfs/<SSS>/<scan>.h5`
(datasets `frames` and `tforms` in one file) or the validation/test layout
`frames/<SSS>/<scan>.h5` + `transfs/<SSS>/<scan>.h5`, with optional landmark files
`landmarks/landmark_<SSS>.h5` or `landmark/landmark_<SSS>.h5` (one dataset per scan); or a CSV as
the original converter takes (`sweep_id`, and `raw_tus_rec_sweep_path` or `raw_tus_rec_frames_path`
+ `raw_tus_rec_tforms_path`, optional `split`; relative paths are relative to the CSV's folder).

Geometry. TUS-REC maps a 1-based pixel p = (x, y, 0, 1) to world by tforms @ C @ S @ p (S =
diag(sx, sy, 1, 1), C = image mm -> tracker tool). DualTrack uses 0-based pixels (u, v) and an
image frame centred on the image, pixel_to_image = [diag(sx, sy, 1) | -((W-1)/2*sx, (H-1)/2*sy, 0)].
With tracking = tforms @ C @ Tr((W+1)/2*sx, (H+1)/2*sy, 0) the two agree:
tracking @ pixel_to_image @ (u, v, 0, 1) = tforms @ C @ S @ (u+1, v+1, 0, 1), i.e. DualTrack pixel
(u, v) is TUS-REC pixel (u+1, v+1). Landmarks are stored unchanged (frame, x, y; x, y 1-based).

Output: `<out>/<sweep_id>.h5` (sweep_id = `sub<SSS>__<scan>`, the challenge's dataset_keys naming)
and `<out>/metadata.csv`, which registry.read_sweep_csv reads (the original converter writes a CSV
without the index column its own reader expects; docs/tusrec.md, section "Conversion to DualTrack
sweeps").
"""
from collections.abc import Sequence
import csv
import dataclasses
import os

from absl import app
from absl import flags
from absl import logging
import h5py
import numpy as np

from dualtrack_jax.data import registry
from dualtrack_jax.data import sweeps
from ultrasound_common import errors

FRAMES = 'frames'
TFORMS = 'tforms'
METADATA_CSV = 'metadata.csv'
CALIB_CSV = 'calib_matrix.csv'
# The labels on lines 1 and 6 of calib_matrix.csv, used as keys in error messages.
CALIB_SCALE = 'scaling_from_pixel_to_mm'
CALIB_IMAGE_TO_TOOL = ('spatial_calibration_from_image_coordinate_system_to_tracking_tool_'
                       'coordinate_system')

# Public TUS-REC 2024 calibration (docs/tusrec.md, section "Calibration"): pixel spacing (sx, sy)
# in mm and C (image mm -> tracker tool). The 2025 values are unpublished; pass the shipped
# calib_matrix.csv for 2025 data.
SPACING_2024 = (0.229389190673828, 0.220979690551758)
IMAGE_TO_TOOL_2024 = np.array([
    [0.231064671309448, -0.21805203504134, 0.948189025293473, -70.7413291931152],
    [-0.190847036221471, -0.965787272832032, -0.175591436013112, -80.6505661010742],
    [0.954036962825936, -0.140386087807861, -0.264773903381482, -46.1766223907471],
    [0.0, 0.0, 0.0, 1.0],
])


@dataclasses.dataclass(frozen=True, eq=False)
class Calibration:
  """Pixel spacing (sx, sy) in mm and C, the (4, 4) image mm -> tracker tool transform."""
  spacing: tuple[float, float]
  image_to_tool: np.ndarray

  @classmethod
  def tusrec_2024(cls) -> 'Calibration':
    return cls(SPACING_2024, IMAGE_TO_TOOL_2024.copy())

  @classmethod
  def from_csv(cls, path: str) -> 'Calibration':
    """Reads a challenge calib_matrix.csv: lines 2-5 hold S, lines 7-10 hold C (comma-separated).

    Values are kept in float64 (the official reader casts them to float32).
    """
    with open(path, encoding='utf-8') as f:
      lines = f.read().splitlines()
    if len(lines) < 10:
      raise sweeps.SweepFileError(path, None, f'expected 10 lines (2 labels, 2 4x4 matrices), '
                                  f'got {len(lines)}')

    def matrix(first: int, name: str) -> np.ndarray:
      rows = []
      for i in range(first, first + 4):
        try:
          row = [float(v) for v in lines[i].split(',')]
        except ValueError as e:
          raise sweeps.SweepFileError(path, name, f'line {i + 1}: {e}') from e
        if len(row) != 4 or not np.isfinite(row).all():
          raise sweeps.SweepFileError(path, name, f'line {i + 1}: expected 4 finite numbers, '
                                      f'got {lines[i]!r}')
        rows.append(row)
      return np.array(rows)

    scale, image_to_tool = matrix(1, CALIB_SCALE), matrix(6, CALIB_IMAGE_TO_TOOL)
    sx, sy = scale[0, 0], scale[1, 1]
    if not (sx > 0 and sy > 0) or not np.array_equal(scale, np.diag([sx, sy, 1.0, 1.0])):
      raise sweeps.SweepFileError(
          path, CALIB_SCALE, f'expected diag(sx, sy, 1, 1), sx, sy > 0; got {scale.tolist()}')
    sweeps.check_rigid(path, CALIB_IMAGE_TO_TOOL, image_to_tool)
    return cls((float(sx), float(sy)), image_to_tool)

  def differs_from(self, other: 'Calibration', tol: float = 1e-6) -> bool:
    return not (np.allclose(self.spacing, other.spacing, rtol=0, atol=tol)
                and np.allclose(self.image_to_tool, other.image_to_tool, rtol=0, atol=tol))


def pixel_to_image(spacing: Sequence[float], image_shape: tuple[int, int]) -> np.ndarray:
  """(4, 4) map of 0-based pixels (col, row, 0, 1) to the centred image frame in mm.

  Computed exactly; the original converter hard-codes its entries rounded to 8 decimals.
  """
  (sx, sy), (h, w) = spacing[:2], image_shape
  m = np.diag([sx, sy, 1.0, 1.0])
  m[:2, 3] = -(w - 1) / 2 * sx, -(h - 1) / 2 * sy
  return m


def tusrec_to_tracking(tforms: np.ndarray, calibration: Calibration,
                       image_shape: tuple[int, int]) -> np.ndarray:
  """(N, 4, 4) tool -> world `tforms` to DualTrack tracking (centred image frame -> world), float64.

  tracking = tforms @ C @ Tr((W+1)/2*sx, (H+1)/2*sy, 0), where Tr maps centred image mm to TUS-REC
  image mm (whose origin is one pixel up-left of the top-left pixel centre).
  """
  (sx, sy), (h, w) = calibration.spacing, image_shape
  centred_to_tusrec = np.eye(4)
  centred_to_tusrec[:2, 3] = (w + 1) / 2 * sx, (h + 1) / 2 * sy
  return np.asarray(tforms, np.float64) @ calibration.image_to_tool @ centred_to_tusrec


@dataclasses.dataclass(frozen=True)
class RawScan:
  """One raw TUS-REC scan: where its frames, tforms and (optional) landmarks are."""
  sweep_id: str
  frames_path: str
  tforms_path: str
  subject: str | None = None
  scan: str | None = None
  landmarks_path: str | None = None  # A file holding a dataset named `scan`.
  split: str | None = None  # Given by an input CSV; None: from the `split` argument or subject.
  extra: dict = dataclasses.field(default_factory=dict)


def find_scans(data_dir: str) -> list[RawScan]:
  """Lists the scans of a challenge folder (training and/or validation/test layout)."""
  data_dir = os.path.abspath(data_dir)
  joint, frames_root, tforms_root = (os.path.join(data_dir, d)
                                     for d in ('frames_transfs', 'frames', 'transfs'))
  roots = []
  if os.path.isdir(joint):
    roots.append((joint, joint))
  if os.path.isdir(frames_root) and os.path.isdir(tforms_root):
    roots.append((frames_root, tforms_root))
  if not roots:
    raise errors.MissingFileError(
        f'{data_dir}: no TUS-REC scans: expected a folder frames_transfs/ '
        f'(training layout) or frames/ and transfs/ (validation/test layout)')
  scans = []
  for f_root, t_root in roots:
    for subject in sorted(os.listdir(f_root)):
      if not os.path.isdir(os.path.join(f_root, subject)):
        continue
      landmarks = [os.path.join(data_dir, d, f'landmark_{subject}.h5')
                   for d in ('landmarks', 'landmark')]
      landmarks = next((p for p in landmarks if os.path.isfile(p)), None)
      for name in sorted(os.listdir(os.path.join(f_root, subject))):
        if not name.endswith('.h5'):
          continue
        scan = name[:-len('.h5')]
        tforms_path = os.path.join(t_root, subject, name)
        if not os.path.isfile(tforms_path):
          raise errors.MissingFileError(f'{tforms_path}: missing (the tforms of '
                                        f'{os.path.join(f_root, subject, name)})')
        scans.append(RawScan(sweep_id=f'sub{subject}__{scan}',
                             frames_path=os.path.join(f_root, subject, name),
                             tforms_path=tforms_path, subject=subject, scan=scan,
                             landmarks_path=landmarks))
  return scans


def read_input_csv(csv_path: str) -> list[RawScan]:
  """Reads an input CSV in the original converter's format (see the module docstring)."""
  csv_path = os.path.abspath(csv_path)
  folder = os.path.dirname(csv_path)
  with open(csv_path, newline='', encoding='utf-8-sig') as f:
    reader = csv.DictReader(f)
    if reader.fieldnames is None or 'sweep_id' not in reader.fieldnames:
      raise registry.DatasetError(f'{csv_path}: missing column sweep_id; '
                                  f'found {reader.fieldnames}')
    scans = []
    for row in reader:
      where = f'{csv_path}: line {reader.line_num}'
      row = {k: (v or '').strip() for k, v in row.items() if k}
      joint = row.pop('raw_tus_rec_sweep_path', '')
      frames = row.pop('raw_tus_rec_frames_path', '') or joint
      tforms = row.pop('raw_tus_rec_tforms_path', '') or joint
      if not (frames and tforms):
        raise registry.DatasetError(
            f'{where}: give raw_tus_rec_sweep_path, or raw_tus_rec_frames_path and '
            f'raw_tus_rec_tforms_path')
      split = row.pop('split', '') or None
      if split is not None and split not in registry.SPLITS:
        raise registry.DatasetError(
            f'{where}: column split: unknown split {split!r}; allowed: {list(registry.SPLITS)}')
      frames, tforms = (os.path.normpath(os.path.join(folder, p)) for p in (frames, tforms))
      sweep_id = row.pop('sweep_id')
      if not sweep_id:
        raise registry.DatasetError(f'{where}: column sweep_id is empty')
      scans.append(RawScan(sweep_id=sweep_id, frames_path=frames, tforms_path=tforms,
                           subject=os.path.basename(os.path.dirname(frames)), split=split,
                           extra=row))
  return scans


def default_split(subject: str | None) -> str:
  """Challenge convention: subjects 000-049 train, 050-052 val, others test."""
  if subject is None or not subject.isdigit():
    raise errors.InputError(
        f'cannot derive the split from subject folder {subject!r} (not a number); '
        f'pass split= (--split) or a split column')
  s = int(subject)
  return 'train' if s < 50 else 'val' if s <= 52 else 'test'


def _read_dataset(path: str, key: str) -> np.ndarray:
  try:
    with h5py.File(path, 'r') as f:
      if key not in f:
        raise sweeps.SweepFileError(path, key, f'missing (found keys: {sorted(f.keys())})')
      return f[key][()]
  except OSError as e:
    raise sweeps.SweepFileError(path, None, f'not a readable HDF5 file: {e}') from e


def read_raw_frames(path: str) -> np.ndarray:
  """The `frames` of a raw scan file: (N, H, W) uint8, N >= 2."""
  frames = _read_dataset(path, FRAMES)
  if frames.dtype != np.uint8 or frames.ndim != 3:
    raise sweeps.SweepFileError(path, FRAMES, f'expected (N, H, W) uint8, got {frames.shape} '
                                f'{frames.dtype}')
  if len(frames) < 2:
    raise sweeps.SweepFileError(path, FRAMES, f'fewer than 2 frames: {len(frames)}')
  return frames


def read_raw_tforms(path: str, num_frames: int, frames_path: str | None = None) -> np.ndarray:
  """The rigid (N, 4, 4) tool -> world `tforms` of a raw scan file of `num_frames` frames
  (those of `frames_path`, named in the error when the frames live in another file)."""
  tforms = _read_dataset(path, TFORMS)
  if tforms.dtype.kind != 'f' or tforms.shape != (num_frames, 4, 4):
    of = f' of {frames_path}' if frames_path else ''
    raise sweeps.SweepFileError(path, TFORMS, f'expected ({num_frames}, 4, 4) float (one per '
                                f'frame{of}), got {tforms.shape} {tforms.dtype}')
  sweeps.check_rigid(path, TFORMS, tforms)
  return tforms


def read_raw_landmarks(path: str, scan: str) -> np.ndarray:
  """The (L, 3) integer landmarks (frame, x, y) of `scan` in a landmark_<SSS>.h5 file."""
  landmarks = _read_dataset(path, scan)
  if landmarks.dtype.kind not in 'iu' or landmarks.ndim != 2 or landmarks.shape[1] != 3:
    raise sweeps.SweepFileError(path, scan, f'expected (L, 3) integer landmarks, got '
                                f'{landmarks.shape} {landmarks.dtype}')
  return landmarks


def read_raw_scan(scan: RawScan) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """Reads and checks a raw scan: frames (N, H, W) uint8, tforms (N, 4, 4) rigid, landmarks.

  The challenge's test layout ships frames and landmarks without tforms (the organisers keep
  them), so a submission calls the three readers on their own.
  """
  frames = read_raw_frames(scan.frames_path)
  tforms = read_raw_tforms(scan.tforms_path, len(frames), scan.frames_path)
  landmarks = (None if scan.landmarks_path is None
               else read_raw_landmarks(scan.landmarks_path, scan.scan))
  return frames, tforms, landmarks


def convert_scans(scans: Sequence[RawScan], out_dir: str, *,
                  calibration: Calibration | None = None, split: str | None = None,
                  skip_existing: bool = False) -> str:
  """Converts scans to `<out_dir>/<sweep_id>.h5` and writes `<out_dir>/metadata.csv`.

  Args:
    scans: from find_scans or read_input_csv.
    out_dir: output folder (created).
    calibration: defaults to Calibration.tusrec_2024().
    split: the split of scans that do not name one; None derives it from the subject id.
    skip_existing: keep output files that exist and validate (to resume an interrupted run of the
      SAME conversion; files are written atomically, so an existing file is complete).

  Returns:
    The path of the sweep CSV.
  """
  calibration = calibration or Calibration.tusrec_2024()
  if split is not None and split not in registry.SPLITS:
    raise errors.InputError(f'unknown split {split!r}; allowed: {list(registry.SPLITS)}')
  ids = [s.sweep_id for s in scans]
  if len(set(ids)) != len(ids):
    raise errors.InputError(f'duplicate sweep ids: {sorted({i for i in ids if ids.count(i) > 1})}')
  # Resolved before converting anything, so that a scan without a split fails fast.
  splits = [scan.split or split or default_split(scan.subject) for scan in scans]
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  records = []
  for i, (scan, scan_split) in enumerate(zip(scans, splits)):
    out = os.path.join(out_dir, f'{scan.sweep_id}.h5')
    if skip_existing and os.path.exists(out):
      sweeps.validate_sweep(out)
      logging.info('[%d/%d] kept existing %s', i + 1, len(scans), out)
    else:
      frames, tforms, landmarks = read_raw_scan(scan)
      image_shape = frames.shape[1:]
      sx, sy = calibration.spacing
      sweeps.write_sweep(out, images=frames,
                         tracking=tusrec_to_tracking(tforms, calibration, image_shape),
                         spacing=(sx, sy, 1.0),
                         pixel_to_image=pixel_to_image((sx, sy), image_shape),
                         landmarks=landmarks)
      logging.info('[%d/%d] wrote %s', i + 1, len(scans), out)
    extra = {'subject': scan.subject or '', 'scan': scan.scan or '',
             'raw_frames_path': scan.frames_path, 'raw_tforms_path': scan.tforms_path,
             **scan.extra}
    records.append(registry.SweepRecord(scan.sweep_id, out, scan_split, extra))
  csv_path = os.path.join(out_dir, METADATA_CSV)
  registry.write_sweep_csv(csv_path, records)
  return csv_path


def _define_flags() -> None:
  """CLI flags, defined only when run as a script so importing this module defines none."""
  flags.DEFINE_multi_string('data_dir', [], 'TUS-REC challenge folder(s) (repeatable).')
  flags.DEFINE_string('input_csv', None, "Input CSV in the original converter's format.")
  flags.DEFINE_string('out', None, 'Output folder for the sweeps and metadata.csv.')
  flags.DEFINE_string('calibration', None,
                      'calib_matrix.csv to use; default: the built-in TUS-REC 2024 calibration.')
  flags.DEFINE_enum('split', None, list(registry.SPLITS),
                    "Split for all scans; default: the input CSV's split column, else from the "
                    'subject id (000-049 train, 050-052 val, others test).')
  flags.DEFINE_bool('skip_existing', False, 'Keep already converted sweeps (resume).')
  flags.DEFINE_string('register_as', None, 'Also register the CSV under this dataset name.')
  flags.DEFINE_string('registry', None,
                      f'Registry file for --register_as; default ${registry.REGISTRY_ENV} or '
                      f'{registry.DEFAULT_REGISTRY}.')


def main(argv: Sequence[str]) -> None:
  del argv
  cfg = flags.FLAGS
  if not cfg.out or not (cfg.data_dir or cfg.input_csv):
    raise app.UsageError('give --out and --data_dir (repeatable) and/or --input_csv')
  scans = [s for d in cfg.data_dir for s in find_scans(d)]
  if cfg.input_csv:
    scans += read_input_csv(cfg.input_csv)
  if cfg.calibration:
    calibration = Calibration.from_csv(cfg.calibration)
  else:
    calibration = Calibration.tusrec_2024()
    for d in cfg.data_dir:
      shipped = os.path.join(d, CALIB_CSV)
      if os.path.isfile(shipped) and Calibration.from_csv(shipped).differs_from(calibration):
        logging.warning('%s differs from the built-in 2024 calibration; pass --calibration=%s '
                        'to use it', shipped, shipped)
  csv_path = convert_scans(scans, cfg.out, calibration=calibration, split=cfg.split,
                           skip_existing=cfg.skip_existing)
  print(f'wrote {len(scans)} sweeps and {csv_path}')
  if cfg.register_as:
    path = registry.register_dataset(cfg.register_as, csv_path, cfg.registry)
    print(f'registered dataset {cfg.register_as!r} in {path}')


if __name__ == '__main__':
  _define_flags()
  errors.run(main, 'dualtrack_jax.data.tusrec')
