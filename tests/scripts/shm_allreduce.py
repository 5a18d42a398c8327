"""Run under the deepspeed launcher on one host: after ``distributed.init`` no rank's shared-memory
all-reduce segment is left in /dev/shm, and DeepSpeed's shm all-reduce still sums correctly.

Used by test_reliability.py. Usage: deepspeed --no_local_rank --num_gpus N scripts/shm_allreduce.py OUT.json
"""

import json
import sys
from pathlib import Path

import torch


def main() -> None:
    out = Path(sys.argv[1])
    import deepspeed.comm as ds_dist
    from deepspeed.comm import comm as ds_comm

    from factorllm_ds import distributed

    info = distributed.init(300)
    torch.distributed.barrier()  # every rank is past its unlink
    left = [p.name for p in distributed.shm_buffer_names()]
    backend = ds_comm.cdb
    uses_shm = backend.shm_comm_op is not None and getattr(backend, "shm_vector_kernel_level", 0) >= 1
    sums = []
    for numel in (1000, 3 * 2**20):  # DeepSpeed's naive (<= 1 MB) and distributed shm algorithms
        tensor = torch.full((numel,), float(info.rank + 1))
        ds_dist.inference_all_reduce(tensor)
        sums.append([float(tensor.min()), float(tensor.max())])
    if info.rank == 0:
        out.write_text(json.dumps({"left": left, "uses_shm": uses_shm, "sums": sums, "world": info.world_size}))
    distributed.hard_exit(0)


if __name__ == "__main__":
    main()
