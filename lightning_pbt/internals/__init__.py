"""``python -m lightning_pbt.internals [PACKAGE ...]``: the public command that checks the Lightning
internals we rely on. The code lives in :mod:`lightning_pbt.plugin.internals`; this package keeps the
command where the docs name it.
"""
