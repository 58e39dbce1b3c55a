"""Test set-up: 8 simulated CPU devices at -O0 (cpu_env.py), parsed absl flags for Grain."""
import os

# Must happen before jax is imported anywhere.
import cpu_env  # noqa: E402  # tests/ is on sys.path, as for the other helper modules.

os.environ.setdefault('XLA_FLAGS', cpu_env.xla_flags(8))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import flags  # noqa: E402

from launch import xla_flags  # noqa: E402

# The entry points' default XLA flags (faster CPU convolutions), for in-process tests too.
xla_flags.apply_defaults()

# Grain's multiprocessing reads absl flags; tests do not go through absl.app.run.
flags.FLAGS.mark_as_parsed()
