"""Reconstruction: array backend, the streaming iterative solver, and quality metrics."""

from hxn_liveptycho.recon.backend import array_namespace, get_array_module, to_host
from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver
from hxn_liveptycho.recon.metrics import illuminated_mask, object_error

__all__ = [
    "IterativeParams",
    "StreamingSolver",
    "array_namespace",
    "get_array_module",
    "illuminated_mask",
    "object_error",
    "to_host",
]
