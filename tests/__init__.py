"""The test suite; a package so that ``tests.support`` imports by one name everywhere (pytest, Ray
workers, CLI subprocesses and benchmarks, all with the repository root on their path)."""
