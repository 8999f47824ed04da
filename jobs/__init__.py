"""Entry points: the console script and ``ray job submit`` targets."""
