"""The one training loop, checkpoints, distributed helpers and logging; knows methods only by their contract."""
