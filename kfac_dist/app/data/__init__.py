"""Data sets for the kfac-dist application."""

from kfac_dist.app.data.mnist import Split, load_mnist_5k, mnist_5k_path

__all__ = ["Split", "load_mnist_5k", "mnist_5k_path"]
