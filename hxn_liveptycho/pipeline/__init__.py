"""One run from its documents and frames to its result.

``engine`` routes each document and frame to the run it belongs to; ``session``
is one run from its start document to its final write; the stages between the
wire and the solver (``assemble``, ``preprocess``, ``geometry``) and the typed
messages the receivers hand the engine (``inputs``) sit below them.
"""
