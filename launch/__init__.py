"""Launch tooling: run `lumiere train` on Cloud TPU (see launch/tpu.py and docs/tpu.md)."""
