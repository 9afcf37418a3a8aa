"""The tools around a run: Hydra config schemas and builders (``hydra_configs``) and the report of a
finished run (``report``, ``plots``), and ``python -m lightning_pbt best RUN_DIR`` (``command``).

What belongs here: what a user runs before or after training, never code a running population needs.
It may import every other layer (plugin, distributed, algorithm); nothing in lightning_pbt imports it
except the public commands ``python -m lightning_pbt.report`` and ``python -m lightning_pbt``
(import-linter's layers contract).
"""

__all__: list[str] = []  # the layer exports nothing itself: import from its modules
