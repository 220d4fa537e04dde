"""Bundled data files for advkern.nets (see MNIST_LICENSE.txt)."""
