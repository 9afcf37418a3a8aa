"""The tools around a run: Hydra config schemas and builders (``hydra_configs``) and the report of a
finished run (``report``, ``plots``).

What belongs here: what a user runs before or after training, never code a running population needs.
It may import every other layer (plugin, distributed, algorithm); nothing in lightning_pbt imports it
except the public command ``python -m lightning_pbt.report`` (import-linter's layers contract).
"""

__all__: list[str] = []  # the layer exports nothing itself: import from its modules
