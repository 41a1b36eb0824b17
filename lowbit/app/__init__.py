"""The application layer: the ``lowbit`` command line (``cli``), the demo and its report, the embedded data sets,
the training loop they share, the uniform frontier of the studies and timing helpers."""
