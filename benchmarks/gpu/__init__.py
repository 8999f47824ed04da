"""The GPU suite (``python -m benchmarks.gpu_suite``): one prepared run that measures the product on
a lent H100/H200, or on the CPU with the tiny model (``--dry-run``).

``runner`` budgets the sections' time, runs them and records what they measured (``record``);
``sections`` holds one module per section, which only measures; ``plan``, ``models``, ``device`` and
``processes`` are what the sections share.
"""
