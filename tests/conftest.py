"""Test-session settings: 8 forced host devices and a persistent XLA compilation cache.

The cache matters on a 2-core CPU: many tests build the same small models, and a compiled
train step is reused across tests (and across runs of the suite) instead of recompiled.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("LUMIERE_TEST_JAX_CACHE",
                                 os.path.join(tempfile.gettempdir(), "lumiere_jax_test_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Grain worker processes read absl flags; tests run without absl.app.run.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
