"""A user's own training loop whose bits do not depend on the number of ranks (docs/distributed.md).

Run it on one process or under ``torchrun`` with any world size that divides the micro-batch count:

    python examples/distributed_loop.py --out runs/dp1
    torchrun --standalone --nproc_per_node=2 examples/distributed_loop.py --out runs/dp2
    torchrun --standalone --nproc_per_node=4 examples/distributed_loop.py --out runs/dp4

All three write the same ``model.pt`` bytes. The pieces (each from `axs_lib`):

* `MicroBatchPlan`: a step is ``global_batch_size`` samples in micro-batches; this rank gets ``plan.slots``;
* `ResumableLoader(..., plan=plan)`: this rank's micro-batches of each step, from one global epoch order;
* `SeededDataset`: each sample's random augmentation belongs to (epoch, index), not to a worker or rank;
* ``seed_globals(derive_seed(seed, "step", step, slot))`` before each micro-batch: dropout belongs
  to (step, micro-batch), not to a rank;
* `GradientTree`: ``add`` after each micro-batch's backward, ``reduce`` before the optimizer step.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from axs_lib.distributed import GradientTree, MicroBatchPlan, init_world, shutdown
from axs_lib.loader import ResumableLoader
from axs_lib.reproducibility import derive_seed, seed_globals, set_seed
from axs_lib.samples import SeededDataset
from axs_lib.sampling import ResumableSampler


class NoisySquares(Dataset):
    """64 tiny images of a bright square whose size is the label; augmentation draws from numpy's globals."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int):
        image = np.zeros((1, 12, 12), dtype=np.float32)
        size = 2 + index % 6
        image[:, :size, :size] = 1.0
        image += np.random.normal(0.0, 0.1, image.shape).astype(np.float32)  # exact: SeededDataset seeds it
        return torch.from_numpy(image), torch.tensor(float(size))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args(argv)

    world = init_world(torch.device("cpu"))  # torchrun's environment, or one process
    plan = MicroBatchPlan.from_global(args.global_batch_size, args.micro_batch_size, world.size, world.rank)
    set_seed(args.seed)
    seed_globals(derive_seed(args.seed, "init"))
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(), nn.Linear(8 * 144, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dataset = SeededDataset(NoisySquares(), args.seed)
    loader = ResumableLoader(dataset, plan.micro_batch_size, seed=args.seed, sampler=ResumableSampler(dataset, args.seed),
                             plan=plan, num_workers=args.num_workers)
    tree = GradientTree(model.parameters(), plan, world)
    batches = loader.endless()
    for step in range(args.steps):
        optimizer.zero_grad(set_to_none=True)
        for slot in plan.slots:
            seed_globals(derive_seed(args.seed, "step", step, slot))
            images, sizes = next(batches)
            loss = nn.functional.mse_loss(model(images).squeeze(1), sizes) / plan.micro_batches
            loss.backward()
            tree.add(loss)
        total = tree.reduce()  # the same gradient bits on every rank, for every world size
        optimizer.step()
        if world.is_main:
            print(f"step {step + 1}: loss {float(total):.6f}")
    loader.close()  # before the process group goes: ends the batch stream (else closed at interpreter exit) and the workers
    if world.is_main:
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "loader": loader.state_dict()}, buffer)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.pt").write_bytes(buffer.getvalue())
        print(f"{out / 'model.pt'}: sha256 {hashlib.sha256(buffer.getvalue()).hexdigest()}")
    shutdown(world, wait_for_all=True)  # rank 0 may still be writing: leave together
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
