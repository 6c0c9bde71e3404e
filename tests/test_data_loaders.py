"""Distributed loaders: disjoint equal shards, per-epoch shuffles, reproducible augmentation, workers, MNIST-5k."""

from __future__ import annotations

import pytest
import torch
from data_fakes import write_fake_cifar10
from torch.utils.data import Dataset, TensorDataset

from kfac_dist.app.data.cifar import build_cifar10
from kfac_dist.app.data.loaders import ShardSampler, build_datasets, build_loaders, build_mnist_5k
from kfac_dist.app.data.transforms import SampleKey, resolve_key


class KeyedIndices(Dataset):
    """Items ``(index, a random number from the sample's generator)``: shows what each rank saw and drew."""

    accepts_sample_keys = True

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        index, generator = resolve_key(key)
        return index, torch.rand((), generator=generator)


class GlobalRng(Dataset):
    """Items drawn from the (worker's) global RNG, as a plain third-party transform would."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index):
        return index, torch.rand(())


def epoch_items(loader, sampler=None, epoch=0):
    if sampler is not None:
        sampler.set_epoch(epoch)
    indices, draws = [], []
    for index, draw in loader:
        indices += index.tolist()
        draws += draw.tolist()
    return indices, draws


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar10(root, n_train=40, n_test=11, seed=1)
    return build_cifar10(root)


def test_two_ranks_get_disjoint_equal_shards():
    ds = KeyedIndices(103)
    shards, val_shards = [], []
    for rank in range(2):
        train, val, sampler = build_loaders(ds, ds, batch_size=5, val_batch_size=7, rank=rank, world_size=2, seed=3)
        assert len(train) == 10  # 103 // 2 = 51 samples per rank, 10 full batches of 5
        indices, _ = epoch_items(train, sampler)
        assert len(indices) == 50 and all(len(b[0]) == 5 for b in train)
        shards.append(set(indices))
        val_shards.append(epoch_items(val)[0])
    assert not shards[0] & shards[1]
    # Validation: every sample exactly once across ranks, no padding; lengths differ by at most one.
    assert sorted(val_shards[0] + val_shards[1]) == list(range(103))
    assert [len(v) for v in val_shards] == [52, 51]


def test_set_epoch_reshuffles_and_runs_are_deterministic():
    ds = KeyedIndices(40)
    train, _, sampler = build_loaders(ds, ds, batch_size=4, seed=0)
    e0, e0_again, e1 = epoch_items(train, sampler, 0), epoch_items(train, sampler, 0), epoch_items(train, sampler, 1)
    assert e0 == e0_again and e0[0] != e1[0] and sorted(e0[0]) == sorted(e1[0]) == list(range(40))
    train2, _, sampler2 = build_loaders(ds, ds, batch_size=4, seed=0)
    assert epoch_items(train2, sampler2, 1) == e1
    train3, _, sampler3 = build_loaders(ds, ds, batch_size=4, seed=1)
    assert epoch_items(train3, sampler3, 0)[0] != e0[0]


def test_sampler_yields_keys_seeded_by_seed_and_epoch():
    ds = KeyedIndices(8)
    _, _, sampler = build_loaders(ds, ds, batch_size=2, seed=5)
    sampler.set_epoch(2)
    keys = list(sampler)
    assert all(isinstance(k, SampleKey) for k in keys) and len({k.seed for k in keys}) == 1
    _, _, plain = build_loaders(TensorDataset(torch.arange(8)), ds, batch_size=2, seed=5)
    plain.set_epoch(2)
    assert list(plain) == [k.index for k in keys]


def test_augmentation_independent_of_world_size_and_workers(cifar):
    train_ds, val_ds, _ = cifar
    reference = {}
    train, _, sampler = build_loaders(train_ds, val_ds, batch_size=4, seed=7)
    sampler.set_epoch(3)
    for i, key in enumerate(sampler):
        reference[key.index] = train_ds[key][0]
        if i == 11:
            break
    for world_size, workers in ((1, 2), (2, 0), (2, 2)):
        for rank in range(world_size):
            kwargs = {"rank": rank, "world_size": world_size, "workers": workers, "seed": 7}
            train, val, sampler = build_loaders(train_ds, val_ds, batch_size=4, **kwargs)
            assert train.persistent_workers == (workers > 0) and not train.pin_memory
            sampler.set_epoch(3)
            seen = list(iter(sampler))
            for images, _ in train:
                for image in images:
                    index = seen.pop(0).index
                    if index in reference:
                        assert torch.equal(image, reference.pop(index))
    assert not reference  # every reference sample was met again


def test_loading_does_not_touch_the_global_rng():
    ds = KeyedIndices(20)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    train, val, sampler = build_loaders(ds, TensorDataset(torch.arange(20)), batch_size=4, seed=0)
    epoch_items(train, sampler)
    assert sum(len(x) for (x,) in val) == 20
    assert torch.equal(torch.get_rng_state(), state)


def test_workers_seed_the_global_rng_reproducibly():
    def run(workers, rank=0, seed=0):
        train, _, sampler = build_loaders(GlobalRng(), GlobalRng(), batch_size=3, workers=workers, seed=seed, rank=rank)
        return [epoch_items(train, sampler, e)[1] for e in range(2)]

    first = run(2)
    assert run(2) == first
    assert run(2, seed=1) != first
    assert first[0] != first[1]  # persistent workers: the stream goes on across epochs


def test_pin_memory_only_on_cuda():
    ds = KeyedIndices(8)
    assert build_loaders(ds, ds, batch_size=2, device="cuda").train.pin_memory
    assert build_loaders(ds, ds, batch_size=2, device="cuda:0").val.pin_memory
    assert not build_loaders(ds, ds, batch_size=2, device=torch.device("cpu")).train.pin_memory


def test_errors():
    ds = KeyedIndices(10)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        build_loaders(ds, ds, batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="gets 3 of the 10 training samples, fewer than the local batch size 4"):
        build_loaders(ds, ds, batch_size=4, rank=0, world_size=3)
    with pytest.raises(ValueError, match="val_ds is empty"):
        build_loaders(ds, KeyedIndices(0), batch_size=2)
    with pytest.raises(ValueError, match="unknown data set 'svhn'"):
        build_datasets("svhn", "/data")
    with pytest.raises(ValueError, match="needs a data directory"):
        build_datasets("imagenet")
    with pytest.raises(FileNotFoundError, match="/no/such/dir"):
        build_datasets("cifar10", "/no/such/dir")


def test_shard_sampler_partitions():
    for n, world_size in ((10, 3), (2, 4), (0, 2)):
        shards = [list(ShardSampler(range(n), r, world_size)) for r in range(world_size)]
        assert sorted(sum(shards, [])) == list(range(n))
        assert [len(ShardSampler(range(n), r, world_size)) for r in range(world_size)] == [len(s) for s in shards]


def test_mnist_5k_through_the_loaders():
    train_ds, val_ds, num_classes = build_datasets("mnist-5k")
    assert num_classes == 10 and len(train_ds) == 4000 and len(val_ds) == 1000
    train, val, sampler = build_loaders(train_ds, val_ds, batch_size=64, val_batch_size=500, rank=1, world_size=2)
    sampler.set_epoch(0)
    images, labels = next(iter(train))
    assert images.shape == (64, 1, 28, 28) and labels.shape == (64,) and len(train) == 2000 // 64
    assert sum(len(y) for _, y in val) == 500
    assert torch.equal(build_mnist_5k()[0].tensors[1], train_ds.tensors[1])
