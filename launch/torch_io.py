"""PyTorch weight files as NumPy arrays: `torch.save` files (read without torch, written with it)
and `.safetensors` files (read and written without either package).

`load_state_dict(path)` gives a model's state dict (raw, or the 'model' entry of a training
checkpoint); `load(path)` gives any checkpoint's whole object; `save_state_dict` writes one (torch).
`read_safetensors` / `write_safetensors` handle safetensors; `read_checkpoint` and
`read_state_dict` take either.
The runtime reads and writes the files (launch.convert); model packages convert the arrays.

Format: the zip container of `torch.save` since torch 1.6: `<name>/data.pkl` is the pickled
object, and every tensor storage is the raw bytes of `<name>/data/<key>`.

Safety: the pickle is read by an unpickler that imports nothing. Tensors, storages, dict,
OrderedDict, set and NumPy scalars are rebuilt by our own functions; every other global the
pickle names (a class, or a function such as `os.system`) becomes an inert stand-in that drops its
arguments, so no code from the file ever runs (`torch.load(weights_only=False)`, which the
original DualTrack uses, would run it). A state dict must hold tensors only: a stand-in there is an
error naming the class. Stand-ins elsewhere are expected: the original's training checkpoints
pickle the learning-rate scheduler object (`WarmupScheduler.state_dict()` holds the wrapped
`CosineAnnealingLR` and a `src.optimizer.optimizer.WarmupConfig`), and only 'model' is needed.

Tensors are read lazily: `load_state_dict` reads only the storages of the state dict (never a
training checkpoint's optimiser state). Supported dtypes: float32, float16, bfloat16 (as
`ml_dtypes.bfloat16`, exact), float64, int64, int32, int16, int8, uint8 and bool. Tensors come
back as C-contiguous NumPy copies of their views (size, stride and storage offset applied).
"""
import collections
from collections.abc import Iterator, Mapping
import contextlib
import dataclasses
import json
import os
import pickle
import re
from typing import Any
import zipfile

from absl import logging
import ml_dtypes
import numpy as np

from ultrasound_common import errors
from ultrasound_common import files

# The prefix `torch.compile` puts on every key; the original's `load_model_weights` strips it.
COMPILE_PREFIX = '_orig_mod.'

_STORAGE_DTYPES = {
    'FloatStorage': np.dtype(np.float32),
    'HalfStorage': np.dtype(np.float16),
    'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'DoubleStorage': np.dtype(np.float64),
    'LongStorage': np.dtype(np.int64),
    'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16),
    'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8),
    'BoolStorage': np.dtype(np.bool_),
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stands for `torch.<name>` (e.g. FloatStorage) in the pickle."""
  name: str


@dataclasses.dataclass(frozen=True)
class _Storage:
  """A storage record of the zip: `<prefix>/data/<key>`, `numel` elements of `dtype`."""
  key: str
  dtype: np.dtype
  numel: int


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  """A tensor not read yet: a strided view into a storage."""
  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


class _Opaque:
  """Stand-in for a global the unpickler does not import: takes and drops any arguments."""
  qualified_name = '?'

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    return super().__new__(cls)

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state

  def __setitem__(self, key, value):
    del key, value

  def append(self, value):
    del value

  def extend(self, values):
    del values

  def __repr__(self) -> str:
    return f'<{self.qualified_name}: not loaded>'


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> _TensorRef:
  """`torch._utils._rebuild_tensor[_v2]` (extra v2 arguments: autograd flags, hooks)."""
  del unused
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(f'tensor built from a {type(storage).__name__}, not a storage')
  return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
  """`torch._utils._rebuild_parameter[_with_state]`: an nn.Parameter is its data here."""
  del unused
  return data


# NumPy's scalar constructor (numpy.core.multiarray.scalar), taken without its module's name,
# which moved in NumPy 2.
_NUMPY_SCALAR = np.float64(0).__reduce__()[0]

_ALLOWED = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch', 'Size'): tuple,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    # Protocol-2 pickles write bytes as _codecs.encode(text, 'latin1').
    ('_codecs', 'encode'): lambda text, encoding: text.encode(encoding),
    # NumPy scalars (e.g. a `best_score` that is a np.float64 in a training checkpoint).
    ('numpy', 'dtype'): np.dtype,
    ('numpy.core.multiarray', 'scalar'): _NUMPY_SCALAR,  # Written by NumPy 1.
    ('numpy._core.multiarray', 'scalar'): _NUMPY_SCALAR,  # Written by NumPy 2.
}


class _Unpickler(pickle.Unpickler):
  """Resolves globals from `_ALLOWED` or to `_Opaque` stand-ins; storages to `_Storage`."""

  def __init__(self, file):
    super().__init__(file)
    self._opaque: dict[tuple[str, str], type] = {}

  def find_class(self, module: str, name: str):
    if module == 'torch' and name.endswith('Storage'):
      return _StorageType(name)
    if (module, name) in _ALLOWED:
      return _ALLOWED[module, name]
    if (module, name) not in self._opaque:
      self._opaque[module, name] = type(
          'Opaque', (_Opaque,), {'qualified_name': f'{module}.{name}'})
    return self._opaque[module, name]

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
            and isinstance(pid[4], int)):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
    _, storage_type, key, _, numel = pid  # The device (location) is irrelevant on the host.
    if storage_type.name not in _STORAGE_DTYPES:
      raise pickle.UnpicklingError(
          f'unsupported storage type torch.{storage_type.name} (supported: '
          f'{", ".join(sorted(_STORAGE_DTYPES))})')
    return _Storage(key, _STORAGE_DTYPES[storage_type.name], numel)


class _TensorReader:
  """Reads the `_TensorRef`s of one open checkpoint into NumPy arrays."""

  def __init__(self, path: str, zip_file: zipfile.ZipFile, prefix: str, byteorder: str):
    self._path, self._zip, self._prefix = path, zip_file, prefix
    self._order = '<' if byteorder == 'little' else '>'
    self._storages: dict[str, np.ndarray] = {}

  def _storage(self, storage: _Storage) -> np.ndarray:
    if storage.key not in self._storages:
      record = f'{self._prefix}/data/{storage.key}'
      try:
        raw = self._zip.read(record)
      except KeyError:
        raise errors.InputError(f'{self._path}: storage record {record} is missing') from None
      size = storage.dtype.itemsize
      if len(raw) < storage.numel * size:
        raise errors.InputError(f'{self._path}: {record} holds {len(raw)} bytes, less than '
                                f'{storage.numel} elements of {storage.dtype}')
      # Read as unsigned ints of the same width in the file's byte order, then reinterpret: works
      # for every dtype, bfloat16 included (which has no non-native byte-order variant).
      words = np.frombuffer(raw, np.dtype(f'{self._order}u{size}'), count=storage.numel)
      self._storages[storage.key] = words.astype(f'=u{size}', copy=False).view(storage.dtype)
    return self._storages[storage.key]

  def read(self, ref: _TensorRef, name: str) -> np.ndarray:
    """The tensor as a contiguous array; `name` is for error messages."""
    storage = self._storage(ref.storage)
    ints = (ref.offset, *ref.size, *ref.stride)
    if len(ref.size) != len(ref.stride) or not all(isinstance(v, int) and v >= 0 for v in ints):
      raise errors.InputError(
          f'{self._path}: {name}: bad tensor geometry (offset {ref.offset}, size '
          f'{ref.size}, stride {ref.stride})')
    if 0 in ref.size:
      return np.empty(ref.size, storage.dtype)
    # Bounds check first: as_strided would read outside the storage.
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if last >= storage.size:
      raise errors.InputError(
          f'{self._path}: {name}: a tensor of size {ref.size}, stride {ref.stride} at '
          f'offset {ref.offset} reads past its storage of {storage.size} elements')
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset:], shape=ref.size,
        strides=[s * storage.itemsize for s in ref.stride], writeable=False)
    return np.array(view, order='C')


def _describe(value: Any) -> str:
  if isinstance(value, _Opaque):
    return f'a pickled {value.qualified_name} (never imported nor run)'
  if isinstance(value, type) and issubclass(value, _Opaque):
    return f'the global {value.qualified_name}'
  return f'a {type(value).__name__}'


def _check_file(path: str) -> None:
  if not os.path.exists(path):
    raise errors.MissingFileError(f'{path}: no such file')
  if not os.path.isfile(path):
    raise errors.InputError(f'{path}: a folder, not a weights file')


@contextlib.contextmanager
def _open(path: str) -> Iterator[tuple[Any, _TensorReader]]:
  """The unpickled object (tensors not read yet) and a reader for its tensors."""
  _check_file(path)
  if not zipfile.is_zipfile(path):
    raise errors.InputError(
        f'{path}: not a zip-format torch.save checkpoint. Files written by '
        'torch<1.6 or with _use_new_zipfile_serialization=False are not supported: '
        're-save with torch>=1.6: torch.save(torch.load(path), path)')
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pickles = [n for n in names if re.fullmatch(r'[^/]+/data\.pkl', n)]
    if len(pickles) != 1:
      raise errors.InputError(
          f'{path}: expected one <name>/data.pkl record in the zip, found {pickles}')
    prefix = pickles[0].split('/')[0]
    byteorder = 'little'  # torch before 2.1 wrote no byteorder record, and only little-endian.
    if f'{prefix}/byteorder' in names:
      byteorder = zf.read(f'{prefix}/byteorder').decode()
      if byteorder not in ('little', 'big'):
        raise errors.InputError(f'{path}: unknown byteorder record {byteorder!r}')
    with zf.open(pickles[0]) as f:
      try:
        obj = _Unpickler(f).load()
      except Exception as e:  # A malformed pickle can fail in many ways; all mean a bad file.
        raise errors.InputError(f'{path}: cannot read {pickles[0]}: {e}') from e
    yield obj, _TensorReader(path, zf, prefix, byteorder)


def load(path: str) -> Any:
  """Unpickles a `torch.save` file (zip format) with every tensor as a NumPy array.

  Tensors are read wherever plain containers (dict, OrderedDict, list, tuple) lead to them. Objects
  of any other class come back as inert stand-ins (`repr` names the class) with nothing inside:
  they were neither imported nor run, and the tensors they held are not read.

  Raises:
    ValueError: not a torch>=1.6 zip checkpoint, a malformed one, or an unsupported dtype.
  """
  path = os.fspath(path)
  with _open(path) as (obj, reader):
    return _materialize(obj, reader, 'checkpoint', {})


def _materialize(obj: Any, reader: _TensorReader, name: str, memo: dict[int, Any]) -> Any:
  """`obj` with its `_TensorRef`s read; `memo` keeps shared (and cyclic) containers shared."""
  if isinstance(obj, _TensorRef):
    return reader.read(obj, name)
  if id(obj) in memo:
    return memo[id(obj)]
  if isinstance(obj, dict):
    out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
    memo[id(obj)] = out
    for key, value in obj.items():
      out[key] = _materialize(value, reader, f'{name}[{key!r}]', memo)
    return out
  if isinstance(obj, list):
    out = memo[id(obj)] = []
    out.extend(_materialize(v, reader, f'{name}[{i}]', memo) for i, v in enumerate(obj))
    return out
  if isinstance(obj, tuple):
    return tuple(_materialize(v, reader, f'{name}[{i}]', memo) for i, v in enumerate(obj))
  return obj


def _nested_state_dicts(obj: Mapping[Any, Any]) -> dict[str, Mapping[str, Any]]:
  """The entries of a checkpoint that nests several networks' state dicts (e.g. I-JEPA's
  'encoder', 'predictor', 'target_encoder'): those that map names to tensors only. None for a
  raw state dict (a tensor at the top level)."""
  if any(isinstance(value, _TensorRef) for value in obj.values()):
    return {}
  return {entry: value for entry, value in obj.items()
          if isinstance(entry, str) and isinstance(value, Mapping) and value
          and all(isinstance(k, str) and isinstance(v, _TensorRef) for k, v in value.items())}


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A model's state dict from a `torch.save` file, as NumPy arrays, in the file's key order.

  Accepts a raw state dict or a training checkpoint and reproduces the original's
  `src/utils/utils.py::load_model_weights`: a dict with a 'model' entry (the training checkpoints
  of `src/engine/loops.py::run_training`) gives that entry, and the `_orig_mod.` prefix of
  `torch.compile` is removed. (DDP's `module.` never reaches a checkpoint: the original saves
  `model.module.state_dict()`.) A checkpoint without 'model' that nests several state dicts
  (I-JEPA's 'encoder', 'predictor' and 'target_encoder') gives all of them in one dict, keys
  '<entry>.<key>'; its other entries (optimiser state, numbers) are left out. Only the state
  dicts' tensors are read from the file, not the optimiser state of a training checkpoint.

  Raises:
    ValueError: the file is not a torch>=1.6 zip checkpoint, or the state dict is not a mapping of
      names to tensors of supported dtypes (the message names the file, the key and, for any
      other pickled object, its class).
  """
  path = os.fspath(path)
  with _open(path) as (obj, reader):
    if isinstance(obj, Mapping) and 'model' in obj:
      obj = obj['model']
    elif isinstance(obj, Mapping) and _nested_state_dicts(obj):
      obj = {f'{entry}.{key}': value for entry, state_dict in _nested_state_dicts(obj).items()
             for key, value in state_dict.items()}
    if not isinstance(obj, Mapping):
      raise errors.InputError(
          f'{path}: expected a state dict (or a dict with a "model" state dict), '
          f'found {_describe(obj)}')
    state_dict = {}
    for key, value in obj.items():
      if not isinstance(key, str) or not isinstance(value, _TensorRef):
        raise errors.InputError(
            f'{path}: state dict entry {key!r} is {_describe(value)}, not a tensor')
      name = key.removeprefix(COMPILE_PREFIX)
      if name in state_dict:
        raise errors.InputError(
            f'{path}: the keys {key!r} and {name!r} clash once {COMPILE_PREFIX!r} '
            'is removed')
      state_dict[name] = reader.read(value, key)
  logging.info('Read %d tensors from %s.', len(state_dict), path)
  return state_dict


def save_state_dict(path: str, state_dict: Mapping[str, Any]) -> None:
  """Writes a raw state dict with `torch.save`, atomically (a temp file, then a rename).

  Keys keep their order; bfloat16 arrays become torch.bfloat16 tensors. A checkpoint that nests
  state dicts beside plain values (I-JEPA's training checkpoint) is written as well: arrays in
  nested dicts, lists and tuples become tensors, other values (numbers, strings, None) stay.

  Raises:
    ImportError: torch is not installed (`pip install 'ultrasound-jax[convert]'`).
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top  # Optional: only this function needs it.
  except ImportError:
    raise errors.MissingPackageError("Writing PyTorch checkpoints needs torch: pip install "
                                     "'ultrasound-jax[convert]'") from None

  def tensor(value) -> 'torch.Tensor':
    value = np.array(value, order='C')  # A writable C-order copy that the tensor can own.
    if value.dtype == ml_dtypes.bfloat16:
      return torch.from_numpy(value.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(value)

  def convert(value):
    if isinstance(value, Mapping):
      return collections.OrderedDict((k, convert(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
      return type(value)(convert(v) for v in value)
    return tensor(value) if hasattr(value, '__array__') else value  # NumPy or JAX arrays.

  out = convert(state_dict)
  with files.atomic_output(path) as tmp:
    torch.save(out, tmp)


# ----------------------------------------------------------------------------------------------
# safetensors: an 8-byte little-endian header length, a JSON header, raw little-endian bytes; a few
# lines of NumPy (memory-mapped), so neither the `safetensors` package nor torch is needed.

_ST_DTYPES = {
    'F64': np.dtype('<f8'), 'F32': np.dtype('<f4'), 'F16': np.dtype('<f2'),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype('<i8'), 'I32': np.dtype('<i4'),
    'I16': np.dtype('<i2'), 'I8': np.dtype('i1'), 'U8': np.dtype('u1'), 'BOOL': np.dtype('?'),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads a .safetensors file into NumPy arrays (the `__metadata__` entry is skipped)."""
  path = os.fspath(path)
  _check_file(path)
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(8)
    n = int.from_bytes(head, 'little') if len(head) == 8 else -1
    if not 2 <= n <= size - 8:
      raise errors.InputError(
          f'{path}: not a safetensors file (header length {n}, file size {size})')
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise errors.InputError(f'{path}: safetensors header is not JSON: {e}') from None
  # np.memmap refuses an empty mapping (a file without tensors).
  data = np.zeros(0, np.uint8)
  if size > 8 + n:
    data = np.memmap(path, np.uint8, mode='r', offset=8 + n)
  out = {}
  for key, info in header.items():
    if key == '__metadata__':
      continue
    try:
      dtype, shape = _ST_DTYPES[info['dtype']], tuple(info['shape'])
      begin, end = info['data_offsets']
    except (KeyError, TypeError, ValueError):
      raise errors.InputError(f'{path}: bad safetensors header entry {key!r}: {info!r}') from None
    if end - begin != dtype.itemsize * int(np.prod(shape)) or not 0 <= begin <= end <= data.size:
      raise errors.InputError(
          f'{path}: tensor {key!r} of {info["dtype"]}{list(shape)} has byte range '
          f'[{begin}, {end}) in a data section of {data.size} bytes')
    # One copy out of the mapping, in native byte order.
    out[key] = np.array(data[begin:end].view(dtype).reshape(shape), dtype=dtype.newbyteorder('='))
  return out


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes NumPy arrays as a .safetensors file (header in the given key order), atomically.

  As the `safetensors` package does, the data are laid out by decreasing element size, so that
  every tensor starts at a multiple of its element size.
  """
  arrays = {}
  for key, value in tensors.items():
    value = np.asarray(value)
    name = _ST_NAMES.get(value.dtype.newbyteorder('<') if value.dtype.itemsize > 1 else value.dtype)
    if name is None:
      raise errors.InputError(
          f'write_safetensors: tensor {key!r} has unsupported dtype {value.dtype}')
    arrays[key] = (name, value)
  offsets, offset = {}, 0
  for key in sorted(arrays, key=lambda k: -arrays[k][1].dtype.itemsize):  # A stable sort.
    offsets[key] = [offset, offset + arrays[key][1].nbytes]
    offset += arrays[key][1].nbytes
  header = {'__metadata__': dict(metadata)} if metadata else {}
  for key, (name, value) in arrays.items():
    header[key] = {'dtype': name, 'shape': list(value.shape), 'data_offsets': offsets[key]}
  raw = json.dumps(header, separators=(',', ':')).encode()
  raw += b' ' * (-len(raw) % 8)  # The format pads the header with spaces to 8-byte alignment.
  with files.atomic_output(path) as tmp, open(tmp, 'wb') as f:
    f.write(len(raw).to_bytes(8, 'little'))
    f.write(raw)
    for key in offsets:
      name, value = arrays[key]
      f.write(np.ascontiguousarray(value.astype(_ST_DTYPES[name])).tobytes())


def read_checkpoint(path: str) -> Any:
  """A .safetensors file as a flat dict, or a torch.save file as its unpickled object (no torch)."""
  path = os.fspath(path)
  return read_safetensors(path) if path.endswith('.safetensors') else load(path)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A model's state dict from a .safetensors file or a torch.save file (`load_state_dict`)."""
  path = os.fspath(path)
  return read_safetensors(path) if path.endswith('.safetensors') else load_state_dict(path)
