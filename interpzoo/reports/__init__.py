"""Report figures and metric callbacks: where the framework meets models, metrics and data.

``interpzoo.metrics`` stays tensors-in, numbers-out; everything that needs a network, a datamodule or
matplotlib to draw lives here and is imported only when a run writes its report.
"""
