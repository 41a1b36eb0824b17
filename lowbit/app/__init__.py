"""The application layer: the ``lowbit`` command line (``cli``) and the checkout's benchmarks it runs in process
(``benchmarks``), the demo and its report, the embedded data sets, the training loop they share, the uniform frontier
of the studies, the machine description (``machine``) and timing helpers."""
