"""Dataset registry: sweep CSVs, and a JSON file that maps dataset names to them.

A sweep CSV lists one sweep per row with the columns `sweep_id` (unique), `processed_sweep_path`
(the h5 file; a relative path is relative to the CSV's folder) and `split` (train, val or test);
other columns are kept as `extra`. A leading unnamed index column (pandas writes one, and the
original reads with `index_col=0`) is ignored when reading and written when writing, so that the
original's `SweepsDataset` can read our CSVs too (it resolves relative sweep paths against its
working directory, not the CSV's folder).

The registry file is JSON, `{"name": {"csv": "path/to/metadata.csv"}, ...}` (a relative CSV path
is relative to the registry file's folder; other keys of an entry are ignored). It is looked for
at, in this order: the `registry` argument, the environment variable DUALTRACK_DATASETS,
~/.config/dualtrack_jax/datasets.json.
"""
from collections.abc import Iterable, Sequence
import csv
import dataclasses
import json
import os

from ultrasound_common import errors
from ultrasound_common import files

SWEEP_ID = 'sweep_id'
PATH = 'processed_sweep_path'
SPLIT = 'split'
REQUIRED_COLUMNS = (SWEEP_ID, PATH, SPLIT)
SPLITS = ('train', 'val', 'test')
REGISTRY_ENV = 'DUALTRACK_DATASETS'
DEFAULT_REGISTRY = '~/.config/dualtrack_jax/datasets.json'
# Header names that a pandas-written index column gets.
_INDEX_COLUMN_NAMES = ('', 'Unnamed: 0')


class DatasetError(errors.InputError):
  """A sweep CSV or the registry is malformed or does not name what was asked for."""


@dataclasses.dataclass(frozen=True)
class SweepRecord:
  """One registered sweep: `path` is absolute; `extra` holds the CSV's other columns (strings)."""
  sweep_id: str
  path: str
  split: str
  extra: dict = dataclasses.field(default_factory=dict)


def _as_splits(splits: str | Iterable[str] | None, source: str) -> tuple[str, ...] | None:
  if splits is None:
    return None
  splits = (splits,) if isinstance(splits, str) else tuple(splits)
  unknown = [s for s in splits if s not in SPLITS]
  if unknown:
    raise DatasetError(f'{source}: unknown split(s) {unknown} requested; allowed: {list(SPLITS)}')
  return splits


def read_sweep_csv(csv_path: str | os.PathLike,
                   splits: str | Iterable[str] | None = None) -> list[SweepRecord]:
  """Reads a sweep CSV; returns its records in file order, only those of `splits` if given.

  Checks every row (complete, unique non-empty ids, known splits) and that the sweep file of every
  selected record exists; an empty selection is an error too. Errors name the CSV file, the line
  and the column.
  """
  csv_path = os.path.abspath(os.fspath(csv_path))
  wanted = _as_splits(splits, csv_path)
  if not os.path.isfile(csv_path):
    raise DatasetError(f'{csv_path}: sweep CSV does not exist')
  folder = os.path.dirname(csv_path)
  # utf-8-sig: tolerate the byte-order mark that spreadsheet programs write.
  with open(csv_path, newline='', encoding='utf-8-sig') as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
      raise DatasetError(
          f'{csv_path}: empty file (expected a header with columns {list(REQUIRED_COLUMNS)})')
    skip_index = header[0] in _INDEX_COLUMN_NAMES
    columns = header[1:] if skip_index else header
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
      raise DatasetError(f'{csv_path}: missing column(s) {missing}; found {columns}')
    if len(set(columns)) != len(columns):
      raise DatasetError(f'{csv_path}: duplicate column names in header {columns}')
    records, first_line = [], {}
    for row in reader:
      line = reader.line_num
      if not any(cell.strip() for cell in row):
        continue
      if len(row) != len(header):
        raise DatasetError(
            f'{csv_path}: line {line}: {len(row)} fields, header has {len(header)}')
      values = dict(zip(columns, row[1:] if skip_index else row))
      sweep_id, split = values.pop(SWEEP_ID).strip(), values.pop(SPLIT).strip()
      raw_path = values.pop(PATH).strip()
      if not sweep_id:
        raise DatasetError(f'{csv_path}: line {line}: column {SWEEP_ID!r} is empty')
      if sweep_id in first_line:
        raise DatasetError(
            f'{csv_path}: line {line}: column {SWEEP_ID!r}: duplicate id {sweep_id!r} '
            f'(first on line {first_line[sweep_id]})')
      first_line[sweep_id] = line
      if split not in SPLITS:
        raise DatasetError(
            f'{csv_path}: line {line}: column {SPLIT!r}: unknown split {split!r}; '
            f'allowed: {list(SPLITS)}')
      if not raw_path:
        raise DatasetError(f'{csv_path}: line {line}: column {PATH!r} is empty')
      if wanted is not None and split not in wanted:
        continue
      path = os.path.normpath(os.path.join(folder, os.path.expanduser(raw_path)))
      if not os.path.isfile(path):
        raise DatasetError(
            f'{csv_path}: line {line}: column {PATH!r}: sweep file {path} does not exist')
      records.append(SweepRecord(sweep_id=sweep_id, path=path, split=split, extra=values))
  if wanted is not None and not records:
    raise DatasetError(f'{csv_path}: no sweeps with split in {list(wanted)}')
  return records


def write_sweep_csv(csv_path: str | os.PathLike, records: Sequence[SweepRecord]) -> None:
  """Writes records as a sweep CSV, atomically.

  Columns: an index column, the required columns, then one per `extra` key (first-seen order;
  empty where a record lacks it).

  Sweep paths inside the CSV's folder are written relative to it (so the dataset folder can be
  moved); others are written absolute.
  """
  csv_path = os.path.abspath(os.fspath(csv_path))
  folder = os.path.dirname(csv_path)
  extra_columns, seen = [], set()
  for i, r in enumerate(records):
    if r.sweep_id in seen:
      raise DatasetError(f'{csv_path}: record {i}: duplicate {SWEEP_ID} {r.sweep_id!r}')
    seen.add(r.sweep_id)
    if r.split not in SPLITS:
      raise DatasetError(f'{csv_path}: record {i} ({r.sweep_id}): unknown split {r.split!r}; '
                         f'allowed: {list(SPLITS)}')
    for key in r.extra:
      if key in REQUIRED_COLUMNS or key in _INDEX_COLUMN_NAMES:
        raise DatasetError(
            f'{csv_path}: record {i} ({r.sweep_id}): extra column name {key!r} is reserved')
      if key not in extra_columns:
        extra_columns.append(key)
  with files.atomic_output(csv_path) as tmp, open(tmp, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(['', *REQUIRED_COLUMNS, *extra_columns])
    for i, r in enumerate(records):
      path = os.path.abspath(r.path)
      if os.path.commonpath([path, folder]) == folder:
        path = os.path.relpath(path, folder)
      extras = (r.extra.get(k, '') for k in extra_columns)
      writer.writerow([i, r.sweep_id, path, r.split, *extras])


def _registry_location(registry: str | os.PathLike | None) -> tuple[str, str]:
  """Returns (registry path, how it was chosen)."""
  if registry is not None:
    return os.path.abspath(os.path.expanduser(os.fspath(registry))), 'the registry argument'
  if os.environ.get(REGISTRY_ENV):
    return os.path.abspath(os.path.expanduser(os.environ[REGISTRY_ENV])), f'${REGISTRY_ENV}'
  return os.path.expanduser(DEFAULT_REGISTRY), 'the default location'


def _read_registry(path: str, how: str) -> dict:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding='utf-8') as f:
      entries = json.load(f)
  except json.JSONDecodeError as e:
    raise DatasetError(f'{path} (registry from {how}): invalid JSON: {e}') from e
  if not isinstance(entries, dict):
    raise DatasetError(f'{path}: expected a JSON object {{"name": {{"csv": "path"}}, ...}}')
  for name, entry in entries.items():
    if not isinstance(entry, dict) or not isinstance(entry.get('csv'), str):
      raise DatasetError(
          f'{path}: dataset {name!r}: expected {{"csv": "path/to/sweeps.csv"}}, got {entry!r}')
  return entries


def resolve_dataset(name_or_csv: str | os.PathLike,
                    registry: str | os.PathLike | None = None) -> str:
  """Returns the absolute path of a dataset's sweep CSV.

  A path ending in .csv is used as is; anything else is a dataset name looked up in the registry
  file (see the module docstring for where that file is looked for).
  """
  name = os.fspath(name_or_csv)
  if name.lower().endswith('.csv'):
    return os.path.abspath(os.path.expanduser(name))
  path, how = _registry_location(registry)
  entries = _read_registry(path, how)
  if name not in entries:
    state = f'known: {sorted(entries)}' if entries else 'the file does not exist or is empty'
    raise DatasetError(
        f'unknown dataset {name!r} in registry {path} (from {how}; {state}). Pass a .csv path, '
        f'or add {{"{name}": {{"csv": "..."}}}} to that file (registry.register_dataset).')
  csv_path = os.path.expanduser(entries[name]['csv'])
  return os.path.normpath(os.path.join(os.path.dirname(path), csv_path))


def register_dataset(name: str, csv_path: str | os.PathLike,
                     registry: str | os.PathLike | None = None) -> str:
  """Sets `name` -> `csv_path` (stored absolute) in the registry file, atomically.

  Returns the registry file's path. Other datasets and other keys of the entry are kept.
  """
  if not name or name.lower().endswith('.csv'):
    raise DatasetError(f'invalid dataset name {name!r} (must be non-empty and not end in .csv)')
  path, how = _registry_location(registry)
  entries = _read_registry(path, how)
  entries[name] = {**entries.get(name, {}), 'csv': os.path.abspath(os.fspath(csv_path))}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  files.write_json(path, entries, indent=2, sort_keys=True)
  return path


def load_sweeps(name_or_csv: str | os.PathLike, splits: str | Iterable[str] | None,
                registry: str | os.PathLike | None = None) -> list[SweepRecord]:
  """Records of a dataset (registry name or .csv path) in the given split(s); None: all."""
  return read_sweep_csv(resolve_dataset(name_or_csv, registry), splits)
