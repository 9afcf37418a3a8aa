"""``python -m lightning_pbt.report RUN_DIR``: the public command that reports a finished run. The code
lives in :mod:`lightning_pbt.tools.report`; this package keeps the command where the docs name it.
"""
