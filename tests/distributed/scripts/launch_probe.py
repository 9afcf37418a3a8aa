"""What a rank sees of its launch: written to ``<out>/probe_<RANK>.json`` (tests/distributed/test_launchers.py)."""

import json
import os
import sys
import warnings

import numpy as np
import torch.distributed as dist
from lightning_fabric.utilities.rank_zero import rank_zero_only

dist.init_process_group("gloo")  # the rendezvous every rank of a population run goes through
ranks = [None] * dist.get_world_size()
dist.all_gather_object(ranks, dist.get_rank())
dist.destroy_process_group()
record = {
    "rank": int(os.environ["RANK"]),
    "world": ranks,
    "argv": sys.argv[1:],
    "main": __name__,
    "path0": sys.path[0],
    "rank_zero_only": rank_zero_only.rank,
    "random": float(np.random.random()),
    "warnings": [f[0] for f in warnings.filters[:1]],
}
with open(os.path.join(sys.argv[1], f"probe_{os.environ['RANK']}.json"), "w") as f:
    json.dump(record, f)
sys.exit(int(sys.argv[2]) if record["rank"] == 1 else 0)
