"""mimkit: self-supervised visual pre-training by masked and corrupted image modeling."""

__version__ = "0.1.0"
