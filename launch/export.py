r"""Deployable exports of a run: `python -m launch.export --workdir=RUN --out=DIR [...]`.

An export is a folder that runs the model with nothing but jax, numpy and orbax-checkpoint: no
model package, no config, no training code.

  DIR/model.jaxexport  the inference function, serialized with `jax.export` for --platforms: the
                       variables are its first argument (never constants inside the module), the
                       batch is symbolic ('b') and so is every other dimension the model allows
                       (e.g. a sweep's number of frames 'n')
  DIR/params/          an Orbax (StandardCheckpointer) checkpoint of the inference variables only
                       (no optimiser state), floating leaves cast to --dtype, saved as NumPy
                       arrays (they restore onto any device)
  DIR/manifest.json    format version; the jax and jaxlib versions that exported it; platforms;
                       dtype; the inputs (name, shape with symbolic dimension names, dtype,
                       description), the shape constraints and the outputs (name, shape, dtype,
                       description); the options; the experiment's metadata (preprocessing
                       constants, tasks, conventions, what the caller must still do outside the
                       function); the source run (experiment, run folder, checkpoint, step); the
                       sha256 and size of every other file

  python -m launch.export --workdir=workdirs/fusion --out=exports/fusion --option frame_size=480x640
  python -m launch.export --workdir=workdirs/sonichu --out=exports/femur --option tasks=fetal_femur

--checkpoint: 'best' (default; the latest when the run has no evaluated checkpoint), 'latest', a
  step number, or the path of a step folder (`.../best/900`).
--dtype: float32 (default) or bfloat16: the dtype of the shipped floating variables (the model
  computes in its own dtype).
--platforms: comma-separated, of cpu, cuda, rocm, tpu (default cpu,cuda,tpu): where the artifact
  may run. Lowering needs no such device.
--option KEY=VALUE (repeatable): choices the model needs (e.g. the raw frame size); the
  experiment says which it takes and refuses values it cannot use, and an option it does not
  take is refused.

The folder is written under a temporary name next to DIR and renamed when complete, so an
interrupted export leaves no folder that looks complete; an existing DIR is never overwritten.

The experiment's export_spec
----------------------------
`launch.export` names no model: the run's experiment (`config.experiment`, built with
load_data=False) provides its deployable function through an optional method

  export_spec(variables, options) -> Mapping with
    'fn'          fn(variables, *inputs) -> {output name: array}: the pure inference function,
                  traceable with symbolic shapes; every weight it uses must come from
                  `variables` (a closed-over array would be embedded in the module).
    'variables'   the variables to ship (a subset of the run's is fine, e.g. the heads of the
                  exported tasks): nested mappings with string keys, array leaves.
    'inputs'      a sequence of {'name', 'shape', 'dtype', 'description'}; shape entries are ints
                  or symbolic dimension names ('b', 'n'); a name used twice is one dimension.
    'outputs'     {name: description} of every key that fn returns.
    'constraints' optional: jax.export symbolic constraints over the dimension names, e.g.
                  ('n >= 2', 'n <= 1024').
    'options'     optional: {key: value}, the options it read with their defaults filled in; a
                  given option that is not among them is refused as unknown.
    'metadata'    optional: a JSON-able mapping for the manifest (preprocessing constants, tasks,
                  conventions, what the caller must still do outside the function).
  `options` maps each --option KEY to its VALUE string; the experiment parses and validates them
  (ValueError naming the option).

Loading
-------
`load(DIR)` checks the manifest, the size and sha256 of every file and the jax version, restores
the variables with Orbax, deserializes the function and returns a callable `f(*inputs) -> {name:
array}` that checks every input's rank, dtype, fixed dimensions and the shape constraints first.
It imports no model package. Every problem is one `ExportError` (a ValueError) that names the
file or the input. The hashes catch damaged and edited files; they are not a signature (whoever
can edit the files can edit the manifest).

Compatibility rule: jax runs an exported function for 6 months after the jaxlib that made it
(backward compatibility) but guarantees only 3 weeks the other way. `load` therefore refuses an
artifact exported with a newer jax than the one running (upgrade jax, or export with the older
one); jax itself refuses artifacts past its backward window, and its reason is reported.
"""
import ast
from collections.abc import Mapping, Sequence
import datetime
import hashlib
import json
import operator
import os
import re
import shutil
from typing import Any
import uuid

from absl import app
from absl import flags
import jax
from jax import export as jax_export
import jaxlib
import numpy as np
import orbax.checkpoint as ocp

from launch import checkpointing
from launch import experiment as experiment_lib
from launch import metric_writer
from launch import xla_flags
from ultrasound_common import errors

FORMAT = 'ultrasound_jax.export'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
FUNCTION = 'model.jaxexport'
PARAMS = 'params'
DTYPES = ('float32', 'bfloat16')
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')
_SPEC_KEYS = ('fn', 'variables', 'inputs', 'outputs', 'constraints', 'options', 'metadata')
_INPUT_KEYS = ('name', 'shape', 'dtype', 'description')
_DIMENSION = re.compile(r'[A-Za-z_][A-Za-z0-9_]*')


class ExportError(errors.InputError):
  """A bad export request or artifact: the message names the file, option or input."""


# Writing -----------------------------------------------------------------------------------------

def parse_options(items: Sequence[str]) -> dict[str, str]:
  """['key=value', ...] (the repeatable --option) -> {key: value}; a bad or repeated key fails."""
  options = {}
  for item in items:
    key, sep, value = item.partition('=')
    key = key.strip()
    if not sep or not key:
      raise ExportError(f'--option={item}: expected KEY=VALUE')
    if key in options:
      raise ExportError(f'--option {key} is given twice ({options[key]!r} and {value!r})')
    options[key] = value
  return options


def parse_platforms(text: str | Sequence[str]) -> tuple[str, ...]:
  """'cpu,cuda' (or a sequence) -> ('cpu', 'cuda'), checked against PLATFORMS."""
  names = [p.strip() for p in (text.split(',') if isinstance(text, str) else text)]
  names = [p for p in names if p]
  unknown = sorted(set(names) - set(PLATFORMS))
  if unknown or not names or len(set(names)) != len(names):
    raise ExportError(f'--platforms={",".join(names)}: expected distinct names among '
                      f'{", ".join(PLATFORMS)}')
  return tuple(names)


def _plain_tree(tree: Any, source: str, path: str = '') -> Any:
  """Nested mappings as dicts with string keys (jax.export cannot serialize other keys)."""
  if isinstance(tree, Mapping):
    out = {}
    for key, value in tree.items():
      if not isinstance(key, str):
        raise ExportError(f'{source}: variables key {key!r} at {path or "the root"} is not a '
                          'string (jax.export serializes string keys only)')
      out[key] = _plain_tree(value, source, f'{path}/{key}')
    return out
  if not hasattr(tree, 'shape') or not hasattr(tree, 'dtype'):
    raise ExportError(f'{source}: variables leaf {path} is a {type(tree).__name__}, not an array')
  return tree


def cast_variables(variables: Any, dtype: str) -> Any:
  """The variables as NumPy arrays, floating leaves cast to `dtype` (others unchanged)."""
  target = np.dtype(jax.numpy.dtype(dtype))

  def cast(leaf):
    leaf = np.asarray(leaf)
    return leaf.astype(target) if np.issubdtype(leaf.dtype, np.floating) else leaf

  return jax.tree.map(cast, variables)


def check_spec(spec: Any, source: str) -> dict[str, Any]:
  """The validated export spec of an experiment, as a dict with every key of _SPEC_KEYS."""
  if not isinstance(spec, Mapping):
    raise TypeError(f'{source} must return a mapping, got {type(spec).__name__}')
  missing = [k for k in ('fn', 'variables', 'inputs', 'outputs') if k not in spec]
  unknown = sorted(set(spec) - set(_SPEC_KEYS))
  if missing or unknown:
    raise TypeError(f'{source}: missing keys {missing}, unknown keys {unknown}; expected '
                    f'{_SPEC_KEYS}')
  if not callable(spec['fn']):
    raise TypeError(f"{source}: 'fn' is not callable")
  inputs = []
  for i, item in enumerate(spec['inputs']):
    if not isinstance(item, Mapping) or set(item) != set(_INPUT_KEYS):
      raise TypeError(f'{source}: inputs[{i}] must be a mapping with keys {_INPUT_KEYS}')
    shape = tuple(item['shape'])
    for d in shape:
      if not ((isinstance(d, int) and d >= 0) or (isinstance(d, str)
                                                  and _DIMENSION.fullmatch(d))):
        raise TypeError(f"{source}: input '{item['name']}' has dimension {d!r}; expected an int "
                        '>= 0 or a symbolic dimension name')
    inputs.append(dict(name=str(item['name']), shape=list(shape),
                       dtype=np.dtype(jax.numpy.dtype(item['dtype'])).name,
                       description=str(item['description'])))
  names = [item['name'] for item in inputs]
  if not inputs or len(set(names)) != len(names):
    raise TypeError(f'{source}: inputs must have distinct names, got {names}')
  out = dict(fn=spec['fn'], variables=_plain_tree(spec['variables'], source), inputs=inputs,
             outputs={str(k): str(v) for k, v in dict(spec['outputs']).items()},
             constraints=[str(c) for c in spec.get('constraints') or ()],
             options=dict(spec.get('options') or {}), metadata=dict(spec.get('metadata') or {}))
  for key in ('options', 'metadata'):
    try:
      json.dumps(out[key])
    except (TypeError, ValueError) as e:
      raise TypeError(f"{source}: '{key}' is not JSON-able: {e}") from e
  return out


def _shape_text(shape) -> list[int | str]:
  return [d if isinstance(d, int) else str(d) for d in shape]


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _files(directory: str) -> list[str]:
  """Every file under `directory` but the manifest, as sorted '/'-separated relative paths."""
  paths = []
  for root, _, names in os.walk(directory):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, '/')
      if rel != MANIFEST:
        paths.append(rel)
  return sorted(paths)


def export_run(run: Any, out: str, *, dtype: str = 'float32',
               platforms: str | Sequence[str] = DEFAULT_PLATFORMS,
               options: Mapping[str, str] | None = None) -> dict[str, Any]:
  """Writes the export folder `out` of a restored run and returns its manifest.

  Args:
    run: what `experiment.restore_run` returns (.experiment, .variables, .config,
      .checkpoint_dir, .step, .run_dir).
    out: the export folder; it must not exist.
    dtype: one of DTYPES, for the shipped floating variables.
    platforms: where the artifact may run (PLATFORMS).
    options: --option KEY=VALUE pairs for the experiment's export_spec.
  """
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise ExportError(f'--out={out} exists; an export never overwrites: choose a new folder')
  if dtype not in DTYPES:
    raise ExportError(f'--dtype={dtype}: expected one of {", ".join(DTYPES)}')
  platforms = parse_platforms(platforms)
  options = dict(options or {})
  name = run.config.get('experiment', type(run.experiment).__module__)
  if not callable(getattr(run.experiment, 'export_spec', None)):
    raise ExportError(f"config.experiment '{name}' does not support export (its Experiment has "
                      'no export_spec method)')
  spec = check_spec(run.experiment.export_spec(run.variables, options),
                    f'{name}.Experiment.export_spec')
  unknown = sorted(set(options) - set(spec['options']))
  if unknown:
    raise ExportError(f'--option {", ".join(unknown)}: not an export option of {name} (it takes '
                      f'{", ".join(sorted(spec["options"])) or "none"})')
  variables = cast_variables(spec['variables'], dtype)

  dims = list(dict.fromkeys(d for item in spec['inputs'] for d in item['shape']
                            if isinstance(d, str)))
  try:
    scope = jax_export.SymbolicScope(spec['constraints'])
    symbols = dict(zip(dims, jax_export.symbolic_shape(','.join(dims), scope=scope)
                       if dims else ()))
  except ValueError as e:
    raise ExportError(f'{name}: bad shape constraints {spec["constraints"]}: {e}') from e
  arguments = [jax.ShapeDtypeStruct(tuple(symbols.get(d, d) for d in item['shape']),
                                    item['dtype']) for item in spec['inputs']]
  exported = jax_export.export(jax.jit(spec['fn']), platforms=platforms)(
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables), *arguments)
  results = jax.tree.unflatten(exported.out_tree, exported.out_avals)
  if not isinstance(results, Mapping) or set(results) != set(spec['outputs']):
    raise TypeError(f"{name}: export_spec's fn returns "
                    f'{sorted(results) if isinstance(results, Mapping) else type(results)}, '
                    f"but 'outputs' describes {sorted(spec['outputs'])}")

  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f'.{os.path.basename(out)}.tmp-{uuid.uuid4().hex[:8]}')
  try:
    os.makedirs(tmp)
    with open(os.path.join(tmp, FUNCTION), 'wb') as f:
      f.write(exported.serialize())
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(tmp, PARAMS), variables)
    leaves = jax.tree.leaves(variables)
    manifest = {
        'format': FORMAT, 'format_version': FORMAT_VERSION,
        'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'jax_version': jax.__version__, 'jaxlib_version': jaxlib.__version__,
        'platforms': list(platforms), 'dtype': dtype,
        'function': FUNCTION, 'params': PARAMS,
        'variables': {'count': int(sum(x.size for x in leaves)),
                      'bytes': int(sum(x.nbytes for x in leaves))},
        'inputs': spec['inputs'], 'constraints': spec['constraints'],
        'outputs': [{'name': k, 'shape': _shape_text(results[k].shape),
                     'dtype': np.dtype(results[k].dtype).name, 'description': spec['outputs'][k]}
                    for k in sorted(results)],
        'options': spec['options'], 'metadata': spec['metadata'],
        'source': {'experiment': name, 'run_dir': run.run_dir,
                   'checkpoint_dir': run.checkpoint_dir, 'step': int(run.step)},
        'files': {rel: {'sha256': _sha256(os.path.join(tmp, rel)),
                        'bytes': os.path.getsize(os.path.join(tmp, rel))} for rel in _files(tmp)},
    }
    with open(os.path.join(tmp, MANIFEST), 'w') as f:
      json.dump(manifest, f, indent=2)
    if os.path.exists(out):  # Created meanwhile by someone else: still never overwrite.
      raise ExportError(f'--out={out} appeared during the export; nothing was written there')
    os.rename(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return manifest


# Loading -----------------------------------------------------------------------------------------

def _version(text: str) -> tuple[int, ...]:
  return tuple(int(p) for p in re.findall(r'\d+', str(text))[:3])


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_COMPARE = {ast.GtE: operator.ge, ast.LtE: operator.le, ast.Gt: operator.gt, ast.Lt: operator.lt,
            ast.Eq: operator.eq}
_CALLS = {'floordiv': operator.floordiv, 'mod': operator.mod, 'max': max, 'min': min}


def _evaluate(node: ast.AST, values: Mapping[str, int]) -> int | bool:
  """The value (an int, or a bool for a comparison) of a constraint expression in jax.export's
  syntax, given the dimensions."""
  if isinstance(node, ast.Expression):
    return _evaluate(node.body, values)
  if isinstance(node, ast.Constant) and isinstance(node.value, int):
    return node.value
  if isinstance(node, ast.Name) and node.id in values:
    return values[node.id]
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
    return -_evaluate(node.operand, values)
  if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
    return _BINARY[type(node.op)](_evaluate(node.left, values), _evaluate(node.right, values))
  if (isinstance(node, ast.Compare) and len(node.ops) == 1
      and type(node.ops[0]) in _COMPARE):
    return _COMPARE[type(node.ops[0])](_evaluate(node.left, values),
                                       _evaluate(node.comparators[0], values))
  if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
      and node.func.id in _CALLS and not node.keywords):
    return _CALLS[node.func.id](*(_evaluate(a, values) for a in node.args))
  raise errors.InputError(f'unsupported expression {ast.dump(node)}')


class Model:
  """A loaded export: `model(*inputs) -> {name: array}`.

  Attributes:
    directory: the export folder.
    manifest: its manifest.json.
    variables: the restored variables (on the default device).
    exported: the deserialized `jax.export.Exported`.
  """

  def __init__(self, directory: str, manifest: dict[str, Any], variables: Any,
               exported: jax_export.Exported):
    self.directory, self.manifest = directory, manifest
    self.variables, self.exported = variables, exported
    self._call = jax.jit(exported.call)

  def _expected(self) -> str:
    items = []
    for item in self.manifest['inputs']:
      shape = ', '.join(str(d) for d in item['shape'])
      items.append(f"{item['name']} ({shape}) {item['dtype']}")
    constraints = self.manifest['constraints']
    return ', '.join(items) + (f' with {", ".join(constraints)}' if constraints else '')

  def check_inputs(self, inputs: Sequence[Any]) -> None:
    """Raises ExportError naming the first input whose shape or dtype the export cannot take."""
    specs = self.manifest['inputs']
    if len(inputs) != len(specs):
      raise ExportError(f'{self.directory}: expected {len(specs)} input(s), '
                        f'{self._expected()}; got {len(inputs)}')
    values, bound_by = {}, {}
    for x, item in zip(inputs, specs):
      expected = f"({', '.join(str(d) for d in item['shape'])}) {item['dtype']}"
      shape, dtype = tuple(np.shape(x)), np.dtype(getattr(x, 'dtype', np.asarray(x).dtype))
      problem = None
      if dtype.name != item['dtype']:
        problem = f'dtype {dtype.name}'
      elif len(shape) != len(item['shape']):
        problem = f'rank {len(shape)}'
      else:
        for i, (got, want) in enumerate(zip(shape, item['shape'])):
          if isinstance(want, int):
            if got != want:
              problem = f'dimension {i} is {got}, not {want}'
          elif want in values and values[want] != got:
            problem = f"{want} = {got}, but input '{bound_by[want]}' has {want} = {values[want]}"
          else:
            values[want], bound_by[want] = got, bound_by.get(want, item['name'])
          if problem:
            break
      if problem:
        raise ExportError(f"input '{item['name']}': expected shape {expected}, got shape "
                          f'{shape} {dtype.name} ({problem})')
    for constraint in self.manifest['constraints']:
      names = sorted(set(re.findall(r'[A-Za-z_][A-Za-z0-9_]*', constraint)) - set(_CALLS))
      if not _evaluate(ast.parse(constraint, mode='eval'), values):
        given = ', '.join(f"{n} = {values[n]} (input '{bound_by[n]}')" for n in names)
        raise ExportError(f"inputs break the shape constraint '{constraint}': {given}; "
                          f'expected {self._expected()}')

  def __call__(self, *inputs) -> dict[str, jax.Array]:
    self.check_inputs(inputs)
    return self._call(self.variables, *inputs)


def read_manifest(directory: str) -> dict[str, Any]:
  """The manifest of an export folder, checked for its format."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isdir(directory):
    raise ExportError(f'{directory}: no such export folder')
  if not os.path.isfile(path):
    raise ExportError(f'{path}: missing; {directory} is not a complete export (no manifest)')
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise ExportError(f'{path}: not readable JSON ({e})') from e
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    raise ExportError(f"{path}: not an export manifest (field 'format' is not {FORMAT!r})")
  if manifest.get('format_version') != FORMAT_VERSION:
    raise ExportError(f"{path}: field 'format_version' is {manifest.get('format_version')!r}; "
                      f'this launch.export reads version {FORMAT_VERSION}')
  missing = [k for k in ('jax_version', 'inputs', 'outputs', 'constraints', 'files', 'function',
                         'params') if k not in manifest]
  if missing:
    raise ExportError(f'{path}: fields {missing} missing')
  return manifest


def verify_files(directory: str, manifest: Mapping[str, Any]) -> None:
  """Checks the size and sha256 of every file the manifest lists."""
  for rel, expected in sorted(manifest['files'].items()):
    path = os.path.join(directory, *rel.split('/'))
    if not os.path.isfile(path):
      raise ExportError(f'{path}: missing (listed in {MANIFEST})')
    size = os.path.getsize(path)
    if size != expected['bytes']:
      raise ExportError(f'{path}: {size} bytes, but {MANIFEST} says {expected["bytes"]}; the file '
                        'is truncated or was replaced')
    if _sha256(path) != expected['sha256']:
      raise ExportError(f'{path}: sha256 differs from {MANIFEST}; the file was modified after '
                        'the export')


def check_jax_version(manifest: Mapping[str, Any], path: str) -> None:
  """Refuses an artifact exported with a newer jax than the running one (module docstring)."""
  made, running = manifest['jax_version'], jax.__version__
  if _version(made) > _version(running):
    raise ExportError(
        f'{path}: exported with jax {made}, but this is jax {running}; jax guarantees to run an '
        'exported function only on a jax at least as new as the one that exported it: upgrade '
        f"(pip install -U 'jax>={made}') or export again with jax {running}")


def load(directory: str) -> Model:
  """Loads an export folder (checks, variables, function); see the module docstring."""
  directory = os.path.abspath(directory)
  manifest = read_manifest(directory)
  verify_files(directory, manifest)
  function = os.path.join(directory, manifest['function'])
  check_jax_version(manifest, function)
  try:
    with open(function, 'rb') as f:
      exported = jax_export.deserialize(bytearray(f.read()))
  except Exception as e:  # jax's reasons vary (expired, unknown version, corrupt): report them.
    raise ExportError(f'{function}: jax {jax.__version__} cannot deserialize it (exported with '
                      f'jax {manifest["jax_version"]}): {type(e).__name__}: {e}') from e
  platform = jax.default_backend()
  if not set({'gpu': ('cuda', 'rocm')}.get(platform, (platform,))) & set(exported.platforms):
    raise ExportError(f'{function}: exported for {", ".join(exported.platforms)}, but jax runs '
                      f'on {platform} here; export again with that platform in --platforms')
  params = os.path.join(directory, manifest['params'])
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      variables = checkpointer.restore(params)
  except Exception as e:  # Orbax's errors name no file we can point the user at.
    raise ExportError(f'{params}: Orbax cannot restore the variables: {e}') from e
  variables = jax.device_put(variables)
  expected = jax.tree.unflatten(exported.in_tree, exported.in_avals)[0][0]
  if jax.tree.structure(variables) != jax.tree.structure(expected) or any(
      a.shape != b.shape or a.dtype != b.dtype
      for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(expected))):
    raise ExportError(f'{params}: the variables do not match the arguments of {function}')
  return Model(directory, manifest, variables, exported)


# Command line ------------------------------------------------------------------------------------

def export_checkpoint(workdir: str | None, checkpoint: str, out: str, **kwargs) -> dict[str, Any]:
  """Restores a run's checkpoint ('best', 'latest', a step or a step folder) and exports it."""
  if os.path.exists(out):  # Before restoring what may be gigabytes of variables.
    raise ExportError(f'--out={os.path.abspath(out)} exists; an export never overwrites: choose '
                      'a new folder')
  directory, step = checkpointing.find_checkpoint(workdir, checkpoint)
  run = experiment_lib.restore_run(os.path.join(directory, str(step)))
  return export_run(run, out, **kwargs)


def define_flags() -> None:
  """Registers the command-line flags (only when run as a program, so importing is side-free)."""
  flags.DEFINE_string('workdir', None, 'Run folder (holds checkpoints/ and best/).')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest', a step number or a step directory.")
  flags.DEFINE_string('out', None, 'The export folder to create (must not exist).')
  flags.DEFINE_enum('dtype', 'float32', DTYPES, 'dtype of the shipped floating variables.')
  flags.DEFINE_string('platforms', ','.join(DEFAULT_PLATFORMS),
                      f'Comma-separated platforms of {", ".join(PLATFORMS)}.')
  flags.DEFINE_multi_string('option', [], 'KEY=VALUE for the model (repeatable), e.g. '
                            'frame_size=480x640.')
  flags.mark_flag_as_required('out')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  xla_flags.apply_defaults()
  metric_writer.quiet_library_logs()
  f = flags.FLAGS
  manifest = export_checkpoint(f.workdir, f.checkpoint, f.out, dtype=f.dtype,
                               platforms=f.platforms, options=parse_options(f.option))
  inputs = ', '.join(f"{i['name']} ({', '.join(map(str, i['shape']))}) {i['dtype']}"
                     for i in manifest['inputs'])
  outputs = ', '.join(f"{o['name']} ({', '.join(map(str, o['shape']))})"
                      for o in manifest['outputs'])
  print(f"{manifest['source']['checkpoint_dir']} -> {os.path.abspath(f.out)}\n"
        f'  inputs: {inputs}\n  outputs: {outputs}\n'
        f"  platforms: {', '.join(manifest['platforms'])}; variables: "
        f"{manifest['variables']['count']:,} ({manifest['dtype']})")


if __name__ == '__main__':
  define_flags()
  errors.run(main, 'launch.export')
