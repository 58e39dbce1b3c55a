"""Config helpers: clear errors for bad `--config.key=value` overrides, JSON round trip, diffs."""
from collections.abc import Mapping, Sequence
import difflib
import importlib.util
import json
import os
from typing import Any

from absl import flags
import ml_collections

from ultrasound_common import errors


class ConfigError(errors.InputError):
  """A config value is missing or invalid; the message names the key."""


def runtime_keys() -> ml_collections.ConfigDict:
  """The trainer's optional keys (documented in launch/train.py) with their defaults; unset ones
  are typed placeholders, so that every one can be given as `--config.<key>=...`."""
  placeholder = ml_collections.config_dict.placeholder
  return ml_collections.ConfigDict(dict(
      total_steps=placeholder(int), warmup_epochs=0.0, eval_every_steps=placeholder(int),
      eval_every_epochs=placeholder(float), log_every_steps=50, checkpoint_every_steps=1000,
      keep_checkpoints=3, best_metric='', best_mode='min', init_from=ml_collections.ConfigDict(),
      frozen=(), fsdp=False, fsdp_min_size_mb=4.0, num_workers=0, num_eval_figures=4,
      distributed=ml_collections.ConfigDict(dict(
          coordinator_address=placeholder(str), num_processes=placeholder(int),
          process_id=placeholder(int)))))


def with_runtime_keys(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the runtime keys it lacks added (`runtime_keys`); a config file's get_config
  ends with it, and the trainer applies it to any config it is given."""
  for key, value in runtime_keys().items():
    if key not in config:
      with config.unlocked():
        config[key] = value
  return config


def require(config: ml_collections.ConfigDict, key: str) -> Any:
  """`config.<key>` for a dotted key, or a ConfigError naming it."""
  node = config
  for part in key.split('.'):
    if not isinstance(node, (Mapping, ml_collections.ConfigDict)) or part not in node:
      raise ConfigError(f'config.{key} is required but missing')
    node = node[part]
  if node is None:
    raise ConfigError(f'config.{key} is required but None')
  return node


def to_json_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON types (tuples become lists), for checkpoints and comparisons."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def from_json_dict(data: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Inverse of `to_json_dict` (up to tuples, which come back as lists)."""
  return ml_collections.ConfigDict(dict(data))


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping) and value:
      out.update(flatten(value, name + '.'))
    else:
      out[name] = value
  return out


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """Human-readable differences between two JSON config dicts, one line per dotted key."""
  old, new = flatten(old), flatten(new)
  lines = []
  for key in sorted(old.keys() | new.keys()):
    if key not in new:
      lines.append(f'{key}: {old[key]!r} -> (removed)')
    elif key not in old:
      lines.append(f'{key}: (new) -> {new[key]!r}')
    elif old[key] != new[key]:
      lines.append(f'{key}: {old[key]!r} -> {new[key]!r}')
  return lines


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads 'path/to/config.py[:arg]' the way `config_flags.DEFINE_config_file` does.

  Raises:
    ConfigError: the file is missing, is not Python, has no `get_config`, or its `get_config`
      refuses the argument (e.g. an unknown variant); the message names the file.
  """
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ConfigError(f'{spec}: no such config file {path}')
  module_spec = importlib.util.spec_from_file_location('_config_under_check', path)
  if module_spec is None or module_spec.loader is None:
    raise ConfigError(f'{path}: cannot load the config file (not a .py file?)')
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f'{path}:{e.lineno}: not a valid Python config file: {e.msg}') from e
  if not callable(getattr(module, 'get_config', None)):
    raise ConfigError(f'{path}: a config file defines get_config(arg=None) returning a '
                      'ConfigDict; this one does not')
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except (ValueError, KeyError, TypeError) as e:
    raise ConfigError(f'{spec}: {e}') from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'{path}: get_config returned {type(config).__name__}, not a ConfigDict')
  return config


def _override_keys(argv: Sequence[str], flag_name: str) -> list[tuple[str, str]]:
  """(dotted key, argument as written) of every `--<flag_name>.key[=value]` in argv."""
  keys = []
  for arg in argv:
    for prefix in (f'--{flag_name}.', f'--no{flag_name}.'):
      if arg.startswith(prefix):
        keys.append((arg[len(prefix):].split('=', 1)[0], arg))
  return keys


def unknown_override_message(config: ml_collections.ConfigDict, argv: Sequence[str],
                             flag_name: str = 'config') -> str | None:
  """Explains the first override in argv whose key is not in `config`, or None if all exist."""
  known = sorted(flatten(config.to_dict()))
  for key, arg in _override_keys(argv, flag_name):
    node, parents = config, []
    for part in key.split('.'):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node, parents = node[part], parents + [part]
        continue
      where = '.'.join([flag_name] + parents)
      siblings = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      # Near-misses among the siblings, then keys anywhere whose last part is close (a field
      # given at the wrong nesting level, e.g. 'lr' for 'optim.lr').
      close = ['.'.join(parents + [s])
               for s in difflib.get_close_matches(part, siblings, n=3, cutoff=0.6)]
      leaves = {k: k.rsplit('.', 1)[-1] for k in known}
      close += [k for k in known
                if difflib.SequenceMatcher(None, part, leaves[k]).ratio() >= 0.8]
      close = list(dict.fromkeys(close))[:5]
      message = f"unknown config key '{key}' in {arg}: {where} has no field '{part}'."
      if close:
        message += ' Did you mean: ' + ', '.join(close) + '?'
      if siblings:
        message += f' Keys of {where}: ' + ', '.join(siblings) + '.'
      return message
  return None


def _config_spec(argv: Sequence[str], flag_name: str) -> str | None:
  """The value of `--<flag_name>=spec` or `--<flag_name> spec` in argv."""
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{flag_name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{flag_name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def make_flags_parser(config_flag_name: str = 'config'):
  """An absl `flags_parser` that turns config-file problems into clear one-line errors.

  The config file is loaded first (`load_config_file`: a missing file, a syntax error, no
  get_config, a refused variant). `ml_collections.config_flags` raises a bare AttributeError /
  KeyError ("'x'") from deep inside flag parsing for an unknown `--config.x`; this parser names
  the key, lists close matches and the valid keys at that level. Both raise ConfigError, which
  `ultrasound_common.errors.run` reports as one line.
  """

  def parse(argv: list[str]) -> list[str]:
    spec = _config_spec(argv, config_flag_name)
    config = None if spec is None else load_config_file(spec)
    try:
      return flags.FLAGS(argv)
    except (AttributeError, KeyError):
      message = None if config is None else unknown_override_message(config, argv,
                                                                     config_flag_name)
      if message is None:
        raise
      raise ConfigError(message) from None

  return parse

