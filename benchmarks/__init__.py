"""Benchmarks of the superscopes package: ``python -m benchmarks.run`` (``--quick`` for a smoke run).

Every comparison runs in one process, interleaved, after warm-up, under
``torch.inference_mode()`` with a fixed number of torch threads; results go to
``benchmarks/results/`` (JSON, ``latest.md``, PNG plots). See ``benchmarks/README.md``.
"""
