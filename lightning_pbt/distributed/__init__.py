"""The population's machinery, without Lightning: the population-level collectives and watchdog
(``collectives``), moving a member's state in memory (``transfer``; ``staging`` and ``staged_receive``
for its host buffers), serving snapshots and lineage in asynchronous mode (``serving``), the ready-step
protocol (``ready_steps``: lockstep and asynchronous) and agreeing on a checkpoint to resume from
(``resume``).

What belongs here: whatever every rank must do together (or in a known order) over
``torch.distributed``, and what a new transport or a new way of deciding together needs. It may import
torch, ``torch.distributed`` and :mod:`lightning_pbt.algorithm`; never Lightning, ``lightning_pbt.plugin``
or ``lightning_pbt.tools`` (import-linter's layers contract in ``pyproject.toml``).
"""

__all__: list[str] = []  # the layer exports nothing itself: import from its modules
