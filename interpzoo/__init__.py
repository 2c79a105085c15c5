"""interpzoo: the training framework glue (run pipeline, config pre-flight, checkpoint I/O).

The zoo itself lives in the top-level packages ``layers``, ``models``, ``datamodules`` and ``metrics``.
"""

__version__ = "0.1.0"
