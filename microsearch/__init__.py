"""microsearch: find the CIFAR-10 network with the lowest compression score at >= 90% accuracy."""

__version__ = "0.1.0"
