r"""Trains any stage of any model: `python -m launch.train --config=CONFIG.py[:ARG] --workdir=DIR`.

Runs unchanged on one CPU, one GPU, all GPUs of a machine or a multi-host TPU/GPU cluster: the
mesh spans every device of every process, the global batch is split over them and the train state
is replicated (or FSDP-sharded). Restarting the same command resumes from the newest checkpoint in
`--workdir` (state, data position and step) and ends with the same parameters as an uninterrupted
run. Override any config field with `--config.key=value` (nested: `--config.optim.lr=1e-4`).

Multi-process: pass `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` to every
process (or set them in `config.distributed`); on SLURM / Open MPI / multi-host Cloud TPU they are
detected from the environment. Only process 0 writes logs and TensorBoard.

Config keys read by the trainer (model-specific keys are read by the experiment):
  experiment              module with `Experiment(config)`, e.g.
                          'dualtrack_jax.experiments.local_stage1' (see launch/experiment.py).
  seed                    seeds the parameter init, the per-step RNG and the data order.
  batch_size              global batch size (all processes); divisible by the device count.
  num_epochs              run length in epochs of `Experiment.steps_per_epoch` steps ...
  total_steps             ... or in optimiser steps (overrides num_epochs when set).
  warmup_epochs           warmup length of the schedule (default 0).
  eval_every_steps        evaluate every this many steps, or
  eval_every_epochs       every this many epochs (default: only after the last step).
  log_every_steps         console line and TensorBoard scalars (default 50).
  checkpoint_every_steps  training checkpoint interval (default 1000; also after the last step).
  keep_checkpoints        how many training checkpoints to keep (default 3).
  best_metric, best_mode  evaluation metric whose best value ('min' or 'max') keeps its
                          variables under best/ (no best/ when best_metric is empty).
  optim                   lr, weight_decay (0), b1 (0.9), b2 (0.999), eps (1e-8),
                          grad_clip_norm (None = off), schedule ('warmup_cosine' (the
                          original DualTrack's) | 'linear_warmup_cosine' | 'cosine' |
                          'ijepa_warmup_cosine' (with start_lr, final_lr) | 'constant'),
                          final_weight_decay (a cosine ramp of the decay to it), no_decay
                          (regexes of paths without weight decay), sparse_groups (regexes whose
                          first group names a group, e.g. one head per task, that gets no update
                          at all in a step where its gradients are all zero);
                          AdamW as torch.optim.AdamW.
  init_from               start a fresh run (never a resumed one) from other runs: per source name
                          {workdir (run or step folder), checkpoint ('best'), map [(source path,
                          target path)], reinit [target paths re-initialised on purpose],
                          collections {target collection: source collection}, e.g.
                          {'params': 'target'} (an I-JEPA run's target encoder)};
                          strict shapes, errors name the path (launch/checkpointing.py).
  frozen                  regexes over '/'-joined parameter paths (re.fullmatch) that are not
                          trained (no update, no weight decay), e.g. ('cnn/.*',).
  fsdp, fsdp_min_size_mb  shard state leaves >= fsdp_min_size_mb (default 4) over the devices.
  num_workers             Grain worker processes that the trainer adds to the training
                          pipeline (mp_prefetch; 0 = in-process).
  num_eval_figures        figures of each evaluation logged to TensorBoard (default 4).
  distributed             coordinator_address, num_processes, process_id (flags take precedence).
Optional keys that may be overridden on the command line while unset must be declared with
`ml_collections.config_dict.placeholder(type)` in the config file (e.g. total_steps,
optim.grad_clip_norm).

Workdir: checkpoints/<step> (last keep_checkpoints), best/<step> (best variables),
tensorboard/. Exit status 1 with a one-line message on a non-finite loss (the last good
checkpoint is kept), a bad config value, a missing or malformed data file (--traceback shows
the traceback).
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from launch import config_utils
from launch import metric_writer
from launch import sharding
from launch import trainer
from launch import xla_flags
from ultrasound_common import errors

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Registers the command-line flags (only when run as a program, so importing is side-free)."""
  config_flags.DEFINE_config_file('config', None, 'Training config file[:arg].', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Output and resume folder of the run.')
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0 for multi-process runs.')
  flags.DEFINE_integer('num_processes', None, 'Number of processes.')
  flags.DEFINE_integer('process_id', None, 'Index of this process.')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  xla_flags.apply_defaults()
  config = FLAGS.config
  distributed = config.get('distributed') or {}

  def pick(name):
    value = getattr(FLAGS, name)
    return value if value is not None else distributed.get(name)

  sharding.initialize_distributed(pick('coordinator_address'), pick('num_processes'),
                                  pick('process_id'))
  metric_writer.quiet_library_logs()
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  trainer.train_and_evaluate(config, FLAGS.workdir)


def run() -> None:
  """The program: flags, then `main` (with clear errors for unknown --config.* keys)."""
  define_flags()
  errors.run(main, 'launch.train', flags_parser=config_utils.make_flags_parser('config'))


if __name__ == '__main__':
  run()
