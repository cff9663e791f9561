"""Pallas GPU kernels for jaxbnb's hot paths; each kernel module keeps its XLA reference beside it.

Kernels never import the public ``jaxbnb`` API.
"""
