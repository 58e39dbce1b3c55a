"""Test set-up: 8 simulated CPU devices, parsed absl flags for Grain workers."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import flags  # noqa: E402

from launch import xla_flags  # noqa: E402

# The entry points' default XLA flags (faster CPU convolutions), for in-process tests too.
xla_flags.apply_defaults()

# Grain's multiprocessing reads absl flags; tests do not go through absl.app.run.
flags.FLAGS.mark_as_parsed()
