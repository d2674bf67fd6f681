"""The built-in reference setup: the Fashion-MNIST task, the local vendor that serves a model, the footprint."""
