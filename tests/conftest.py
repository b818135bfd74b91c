"""Test-session settings: 8 forced host devices, a persistent XLA compilation cache, and the
slowest test files first.

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


# The test files that take longest (worker-seconds, measured with --durations=0 in CI: 665 s,
# 404, 328, 298, 225, 197, 166, 164, 163, 99), run first. `make test` hands out whole files to
# two workers in collection order (--dist loadfile --no-loadscope-reorder); xdist's default
# order (most tests first) left test_multihost for last, and one worker ran alone for the last
# 4 of 30 minutes.
SLOWEST_FIRST = ("test_multihost.py", "test_notebooks.py", "test_trainer.py", "test_scale.py",
                 "test_masked_conditioning.py", "test_apps.py", "test_gcs.py", "test_models.py",
                 "test_text_to_video.py", "test_plan.py")


def pytest_collection_modifyitems(items):
    """Stable: within a file, and among the files not listed, the collection order stays."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
