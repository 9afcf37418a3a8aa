"""The pure algorithm: search spaces, exploit and explore rules, PB2, the PBT scheduler, lineage records,
the settings that check a callback's arguments, and the population's topology.

What belongs here: every decision PBT makes, as a function of its inputs and an explicit RNG, and the
files a run writes and reads back, so that all of it is tested in milliseconds without a process group.
It may import only this package (``lightning_pbt.algorithm``), the standard library, numpy and scipy
(torch only where a value is a tensor): never ``torch.distributed``, Lightning or any other layer of
lightning_pbt (import-linter's contracts in ``pyproject.toml`` keep this).
"""

__all__: list[str] = []  # the layer exports nothing itself: import from its modules
