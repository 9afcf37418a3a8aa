"""The GPU tier: runs only where CUDA is (``make test-gpu``), skipped with the reason everywhere else.

Free of Hydra (the GPU machines have none): it drives the same multi-process script as the CPU tier.
"""

from __future__ import annotations

import pytest
import torch

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/gpu/" not in str(item.fspath).replace("\\", "/"):
            continue
        item.add_marker(pytest.mark.gpu)
        needed = next((int(m.args[0]) for m in item.iter_markers("gpus")), 1)
        if needed > GPUS:
            reason = "no CUDA device" if GPUS == 0 else f"needs {needed} GPUs, this machine has {GPUS}"
            item.add_marker(pytest.mark.skip(reason=f"{reason}: the GPU tier runs where GPUs are (make test-gpu)"))
