"""Library checks of ``scripts/gpu_smoke.sh``: each prints one ``PASS ...`` or ``FAIL ...`` line.

``python scripts/gpu_smoke.py library --device cuda``
    K-FAC on the device against the same run on the CPU, in float64: a model with every layer kind the library
    preconditions (Embedding, Conv1d, dilated / grouped / depthwise Conv2d, Linear), both compute methods,
    factor and decomposition steps included. On the same arithmetic the two agree to rounding (~1e-15).
``torchrun --nproc_per_node=W scripts/gpu_smoke.py distributed --backend nccl``
    Every rank trains its share of each global batch on its own GPU, gradients averaged, K-FAC spread over the
    ranks with every ``grad_worker_fraction`` and both compute methods; each rank compares its parameters with
    one process training the concatenated batches. Rank 0 prints the lines.

Exit code: 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.comm import Communicator, LocalCommunicator, TorchDistCommunicator

METHODS = ("eigen", "inverse")
FRACTIONS = ("mem-opt", "hybrid-opt", "comm-opt")
STEPS = 4
LOCAL_BATCH = 4
#: Largest relative parameter difference accepted: float64 rounding differs between devices and between
#: reduction orders, by ~1e-15 per step; anything near 1e-6 is a real error (a wrong factor or a lost update).
TOLERANCE = 1e-10


class EveryLayerKind(nn.Module):
    """Tokens through Embedding + Conv1d, an image through dilated, grouped and depthwise Conv2d, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.conv1d = nn.Conv1d(6, 4, 3, padding=1)
        self.dilated = nn.Conv2d(1, 4, 3, padding=2, dilation=2)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4)
        self.hidden = nn.Linear(4 * 5 + 4 * 4 * 4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Logits of 3 classes for (tokens (B, 5), image (B, 1, 6, 6))."""
        text = torch.relu(self.conv1d(self.embed(tokens).transpose(1, 2))).flatten(1)
        pixels = torch.tanh(self.depthwise(torch.relu(self.grouped(torch.relu(self.dilated(image)))))).flatten(1)
        return self.head(torch.tanh(self.hidden(torch.cat([text, pixels], dim=1))))


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def global_batch(step: int, examples: int) -> Batch:
    """The step's batch (tokens, image, labels) on the CPU, the same on every rank and device."""
    generator = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, 11, (examples, 5), generator=generator)
    image = torch.randn(examples, 1, 6, 6, generator=generator, dtype=torch.float64)
    return tokens, image, torch.randint(0, 3, (examples,), generator=generator)


def train(
    device: torch.device,
    comm: Communicator,
    method: str,
    fraction: str,
    part: slice,
    examples: int,
    average: Callable[[nn.Module], None],
) -> list[torch.Tensor]:
    """SGD + K-FAC for STEPS steps on ``part`` of each global batch; the parameters afterwards, on the CPU."""
    torch.manual_seed(0)
    model = EveryLayerKind().double().to(device)
    pre = KFACPreconditioner(
        model,
        factor_update_steps=1,
        inv_update_steps=2,
        damping=0.05,
        kl_clip=1e-2,
        lr=0.1,
        compute_method=method,
        grad_worker_fraction=fraction,
        inv_dtype=torch.float64,
        communicator=comm,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    for step in range(STEPS):
        tokens, image, labels = (t[part].to(device) for t in global_batch(step, examples))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(tokens, image), labels).backward()
        average(model)
        pre.step()
        optimizer.step()
    return [p.detach().cpu() for p in model.parameters()]


def relative_difference(got: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Max over parameters of max |got - ref| / max |ref|."""
    return max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(got, reference, strict=True))


def report(name: str, difference: float) -> bool:
    """Print the check's line; True when it passed."""
    passed = difference <= TOLERANCE
    print(f"{'PASS' if passed else 'FAIL'} {name}: max relative parameter difference {difference:.1e}", flush=True)
    return passed


def no_average(model: nn.Module) -> None:
    """One process: nothing to average."""


def check_library(device: torch.device) -> bool:
    """The device's run against the CPU's, per compute method."""
    whole = slice(None)
    passed = True
    for method in METHODS:
        cpu = train(torch.device("cpu"), LocalCommunicator(), method, "comm-opt", whole, LOCAL_BATCH, no_average)
        other = train(device, LocalCommunicator(), method, "comm-opt", whole, LOCAL_BATCH, no_average)
        name = f"library {device.type} vs cpu, float64, every layer kind, {method}"
        passed &= report(name, relative_difference(other, cpu))
    return passed


def check_distributed(backend: str) -> bool:
    """This rank's distributed runs against one process on the concatenated batches (call under torchrun)."""
    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend)

    def average(model: nn.Module) -> None:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)

    passed = True
    try:
        share = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        whole = slice(None)
        examples = world * LOCAL_BATCH
        for method in METHODS:
            reference = train(device, LocalCommunicator(), method, "comm-opt", whole, examples, no_average)
            for fraction in FRACTIONS:
                got = train(device, TorchDistCommunicator(), method, fraction, share, examples, average)
                worst = torch.tensor([relative_difference(got, reference)], dtype=torch.float64, device=device)
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                if rank == 0:
                    name = f"distributed {backend} W={world} {fraction} {method} vs one process, every rank"
                    passed &= report(name, worst.item())
        # A rank can return from its last all_reduce before its peer has read everything; tearing the groups down
        # then resets the peer's connection, and gloo aborts it ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return passed


def main(argv: list[str] | None = None) -> int:
    """Run one group of checks; exit code 0 when all passed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="check", required=True)
    sub.add_parser("library").add_argument("--device", default="cuda")
    sub.add_parser("distributed").add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.check == "library":
        return 0 if check_library(torch.device(args.device)) else 1
    return 0 if check_distributed(args.backend) else 1


if __name__ == "__main__":
    sys.exit(main())
