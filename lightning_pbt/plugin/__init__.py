"""The Lightning glue: the ``PopulationStrategy`` (process groups, the member-as-world view), the
``PopulationBasedTraining`` callback (hook -> check -> decision -> apply), ``PBTReplay``, putting
hyperparameters into optimizers and modules (``apply``), per-member outputs and console, the edges of a
fit (``fit_edges``: identical starts, a member's last ready step, the results at the end), and the
checked list of Lightning internals we rely on (``internals``).

What belongs here: code that needs a Trainer, a LightningModule or Lightning's classes. The modules that
use Lightning's classes (``lightning_pbt.lightning.GLUE_MODULES``: ``_lightning``, ``callback``,
``outputs``, ``population_view``, ``readiness``, ``replay``, ``strategy``, ``trainer_member``) reach
Lightning only through ``._lightning`` and each other through relative imports, because
:mod:`lightning_pbt.lightning` loads them a second time on ``lightning.pytorch``. It may import
:mod:`lightning_pbt.distributed` and :mod:`lightning_pbt.algorithm`; never ``lightning_pbt.tools``
(import-linter's layers contract).
"""

__all__: list[str] = []  # the layer exports nothing itself: import from its modules
