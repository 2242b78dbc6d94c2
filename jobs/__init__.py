"""Entry points (``python -m jobs.NAME``): parse arguments, call :mod:`pipeline`."""
