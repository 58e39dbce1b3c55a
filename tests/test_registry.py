"""Tests of the sweep CSV and the dataset registry (read_sweep_csv only checks that files exist)."""
import json
import os
import shutil

import pytest

from dualtrack_jax.data import registry
from dualtrack_jax.data.registry import SweepRecord


def _touch(path) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  open(path, 'wb').close()
  return str(path)


@pytest.fixture(name='dataset')
def fixture_dataset(tmp_path):
  """A dataset folder with 3 sweeps inside and 1 outside, and its CSV."""
  root = tmp_path / 'data'
  records = [
      SweepRecord('a', _touch(root / 'sweeps' / 'a.h5'), 'train', {'subject': '000'}),
      SweepRecord('b', _touch(root / 'b.h5'), 'val', {'subject': '050', 'note': 'x,y "q"'}),
      SweepRecord('c', _touch(root / 'c.h5'), 'train'),
      SweepRecord('d', _touch(tmp_path / 'elsewhere' / 'd.h5'), 'test', {'subject': '060'}),
  ]
  csv_path = str(root / 'metadata.csv')
  registry.write_sweep_csv(csv_path, records)
  return csv_path, records


def _write(path, text: str) -> str:
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
  return str(path)


def test_round_trip(dataset):
  csv_path, records = dataset
  got = registry.read_sweep_csv(csv_path)
  assert [r.sweep_id for r in got] == ['a', 'b', 'c', 'd']
  assert [(r.path, r.split) for r in got] == [(r.path, r.split) for r in records]
  assert got[0].extra == {'subject': '000', 'note': ''}
  assert got[1].extra == {'subject': '050', 'note': 'x,y "q"'}
  with open(csv_path, encoding='utf-8') as f:
    lines = f.read().splitlines()
  assert lines[0] == ',sweep_id,processed_sweep_path,split,subject,note'
  # Inside the CSV's folder: relative; outside: absolute.
  assert lines[1].split(',')[2] == os.path.join('sweeps', 'a.h5')
  assert lines[4].split(',')[2] == records[3].path


def test_splits_and_moved_folder(dataset, tmp_path):
  csv_path, _ = dataset
  assert [r.sweep_id for r in registry.read_sweep_csv(csv_path, 'train')] == ['a', 'c']
  assert [r.sweep_id for r in registry.read_sweep_csv(csv_path, ['val', 'test'])] == ['b', 'd']
  moved = tmp_path / 'moved'
  shutil.copytree(os.path.dirname(csv_path), moved)
  got = registry.read_sweep_csv(moved / 'metadata.csv', 'train')
  assert [r.path for r in got] == [str(moved / 'sweeps' / 'a.h5'), str(moved / 'c.h5')]
  # A split whose files are missing is only checked when selected.
  os.remove(moved / 'b.h5')
  assert len(registry.read_sweep_csv(moved / 'metadata.csv', 'train')) == 2


@pytest.mark.parametrize('header', ['Unnamed: 0,', ',', ''])
def test_original_csv_formats(tmp_path, header):
  """The original's CSVs: pandas index column (named '' or 'Unnamed: 0') or none at all."""
  _touch(tmp_path / 's1.h5')
  index = (lambda i: f'{i},') if header else (lambda i: '')
  path = _write(tmp_path / 'm.csv',
                f'{header}processed_sweep_path,sweep_id,split,check_against\n'
                f'{index(0)}s1.h5,s1,val,\n')
  (r,) = registry.read_sweep_csv(path)
  assert (r.sweep_id, r.path, r.split, r.extra) == ('s1', str(tmp_path / 's1.h5'), 'val',
                                                    {'check_against': ''})


CSV_ERRORS = [
    ('duplicate-id', 'sweep_id,processed_sweep_path,split\ns1,s1.h5,train\ns1,s2.h5,val\n',
     "line 3: column 'sweep_id': duplicate id 's1' (first on line 2)"),
    ('missing-file', 'sweep_id,processed_sweep_path,split\ns1,s1.h5,train\ns3,nope.h5,train\n',
     "line 3: column 'processed_sweep_path': sweep file"),
    ('unknown-split', 'sweep_id,processed_sweep_path,split\ns1,s1.h5,training\n',
     "line 2: column 'split': unknown split 'training'"),
    ('missing-column', 'sweep_id,path,split\ns1,s1.h5,train\n',
     "missing column(s) ['processed_sweep_path']"),
    ('field-count', 'sweep_id,processed_sweep_path,split\ns1,s1.h5\n', 'line 2: 2 fields'),
    ('empty-id', 'sweep_id,processed_sweep_path,split\n,s1.h5,train\n',
     "line 2: column 'sweep_id' is empty"),
    ('empty-file', '', 'empty file'),
]


@pytest.mark.parametrize('text,message', [c[1:] for c in CSV_ERRORS],
                         ids=[c[0] for c in CSV_ERRORS])
def test_csv_errors(tmp_path, text, message):
  _touch(tmp_path / 's1.h5')
  _touch(tmp_path / 's2.h5')
  path = _write(tmp_path / 'bad.csv', text)
  with pytest.raises(registry.DatasetError) as e:
    registry.read_sweep_csv(path)
  assert str(e.value).startswith(f'{path}: ') and message in str(e.value)


def test_split_selection_errors(dataset):
  csv_path, _ = dataset
  with pytest.raises(registry.DatasetError, match=r"unknown split\(s\) \['valid'\]"):
    registry.read_sweep_csv(csv_path, ['train', 'valid'])
  with pytest.raises(registry.DatasetError, match='missing.csv: sweep CSV does not exist'):
    registry.read_sweep_csv(os.path.join(os.path.dirname(csv_path), 'missing.csv'))
  only_train = os.path.join(os.path.dirname(csv_path), 'train.csv')
  registry.write_sweep_csv(only_train, registry.read_sweep_csv(csv_path, 'train'))
  with pytest.raises(registry.DatasetError, match=r"no sweeps with split in \['test'\]"):
    registry.read_sweep_csv(only_train, 'test')


def test_write_errors(tmp_path):
  csv_path = str(tmp_path / 'm.csv')
  with pytest.raises(registry.DatasetError, match="duplicate sweep_id 'a'"):
    registry.write_sweep_csv(csv_path, [SweepRecord('a', 'x', 'train'),
                                        SweepRecord('a', 'y', 'train')])
  with pytest.raises(registry.DatasetError, match="unknown split 'dev'"):
    registry.write_sweep_csv(csv_path, [SweepRecord('a', 'x', 'dev')])
  with pytest.raises(registry.DatasetError, match="'split' is reserved"):
    registry.write_sweep_csv(csv_path, [SweepRecord('a', 'x', 'val', {'split': 'train'})])
  assert not os.listdir(tmp_path)


def test_resolve_dataset_locations(dataset, tmp_path, monkeypatch):
  csv_path, _ = dataset
  assert registry.resolve_dataset(csv_path) == csv_path
  # Explicit argument; a relative CSV path is relative to the registry's folder.
  explicit = _write(tmp_path / 'data' / 'reg.json', json.dumps({'sim': {'csv': 'metadata.csv'}}))
  assert registry.resolve_dataset('sim', explicit) == csv_path
  # Environment variable.
  env = _write(tmp_path / 'env.json', json.dumps({'envset': {'csv': csv_path, 'pixel_mean': 0}}))
  monkeypatch.setenv(registry.REGISTRY_ENV, env)
  assert registry.resolve_dataset('envset') == csv_path
  assert [r.sweep_id for r in registry.load_sweeps('envset', 'val')] == ['b']
  # Default location under the home folder.
  monkeypatch.delenv(registry.REGISTRY_ENV)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  default = tmp_path / 'home' / '.config' / 'dualtrack_jax' / 'datasets.json'
  with pytest.raises(registry.DatasetError) as e:
    registry.resolve_dataset('home')
  assert f"unknown dataset 'home' in registry {default}" in str(e.value)
  assert 'from the default location; the file does not exist' in str(e.value)
  assert registry.register_dataset('home', csv_path) == str(default)
  assert registry.resolve_dataset('home') == csv_path
  assert [r.sweep_id for r in registry.load_sweeps('home', None)] == ['a', 'b', 'c', 'd']


def test_registry_errors(dataset, tmp_path, monkeypatch):
  csv_path, _ = dataset
  reg = str(tmp_path / 'reg.json')
  registry.register_dataset('one', csv_path, reg)
  registry.register_dataset('two', csv_path, reg)
  monkeypatch.setenv(registry.REGISTRY_ENV, reg)
  with pytest.raises(registry.DatasetError) as e:
    registry.load_sweeps('three', 'train')
  assert (f"unknown dataset 'three' in registry {reg} (from ${registry.REGISTRY_ENV}; "
          f"known: ['one', 'two'])") in str(e.value)
  _write(reg, '{"one": {"csv": ')
  with pytest.raises(registry.DatasetError, match='reg.json .*invalid JSON'):
    registry.resolve_dataset('one')
  _write(reg, '{"one": "metadata.csv"}')
  with pytest.raises(registry.DatasetError, match="reg.json: dataset 'one': expected"):
    registry.resolve_dataset('one')
