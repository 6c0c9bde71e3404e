"""The training application end to end: torchrun, Slurm-shaped ranks, ResNet-50, CIFAR format, config errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from app_runs import (
    BIN,
    explain,
    final_accuracy,
    run_horovodrun,
    run_mpiexec,
    run_single,
    run_slurm_shaped,
    run_torchrun,
)
from data_fakes import write_fake_cifar10

from kfac_dist.app.metrics import read_metrics

#: A traceback frame in our code (torchrun's own agent prints a traceback whenever a worker fails).
OUR_TRACEBACK = re.compile(r'File "[^"]*kfac_dist/')


def test_mnist_under_torchrun_two_ranks_reaches_accuracy(tmp_path: Path) -> None:
    result = run_torchrun([f"logging.dir={tmp_path}", "training.epochs=4"])  # 4 x 62 = 248 steps per rank
    assert result.returncode == 0, explain(result)
    accuracy = final_accuracy(result.stdout)
    assert accuracy >= 0.95, explain(result)
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert int(rows[-1]["bytes_sent"]) > 0  # K-FAC factors really travelled between the ranks
    assert len(list((tmp_path / "checkpoints").glob("ckpt-*.pt"))) == 2  # keep: 2


def test_slurm_shaped_ranks_run_the_same_job(tmp_path: Path) -> None:
    results = run_slurm_shaped([f"logging.dir={tmp_path}", "training.epochs=1", "logging.tensorboard=true"])
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank}: {explain(result)}"
    assert final_accuracy(results[0].stdout) > 0.9
    assert "final test accuracy" not in results[1].stdout  # only rank 0 reports
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard event file"


def test_mpiexec_two_ranks_run_the_same_job(tmp_path: Path) -> None:
    if not (BIN / "mpiexec").exists():
        pytest.skip("mpiexec (pip package mpich) is not installed")
    result = run_mpiexec([f"logging.dir={tmp_path}", "training.epochs=1"])
    assert result.returncode == 0, explain(result)
    assert final_accuracy(result.stdout) > 0.9
    assert int(read_metrics(tmp_path / "metrics.csv")[0]["bytes_sent"]) > 0  # two ranks really exchanged factors


def test_mpi_backend_trains_through_the_application(tmp_path: Path) -> None:
    if not (BIN / "mpiexec").exists():
        pytest.skip("mpiexec (pip package mpich) is not installed")
    result = run_mpiexec([f"logging.dir={tmp_path}", "training.epochs=1", "comm.backend=mpi"])
    assert result.returncode == 0, explain(result)
    assert final_accuracy(result.stdout) > 0.9
    assert int(read_metrics(tmp_path / "metrics.csv")[0]["bytes_sent"]) > 0


def test_horovod_backend_trains_through_the_application(tmp_path: Path) -> None:
    if not (BIN / "horovodrun").exists():
        pytest.skip("horovod is not installed (bash scripts/install_horovod.sh)")
    result = run_horovodrun([f"logging.dir={tmp_path}", "training.epochs=1", "comm.backend=horovod"])
    assert result.returncode == 0, explain(result)
    assert final_accuracy(result.stdout) > 0.9


def test_resnet50_on_synthetic_imagefolder_takes_kfac_steps(tmp_path: Path) -> None:
    from data_fakes import load_synthetic_script

    load_synthetic_script().write_synthetic_imagefolder(
        tmp_path / "data", classes=4, train_per_class=4, val_per_class=2, size=40
    )
    result = run_torchrun(
        [
            "--config",
            "configs/imagenet_resnet50.yaml",
            f"data.root={tmp_path / 'data'}",
            "data.image_size=32",
            "data.batch_size=2",
            "data.workers=0",
            "training.max_steps=2",
            "kfac.grad_worker_fraction=mem-opt",
            "kfac.skip_layers=[layer4.*]",  # their 4,609-sided factors take minutes to decompose on 2 CPU cores
            f"logging.dir={tmp_path / 'run'}",
            "logging.tensorboard=false",
        ],
        timeout=500,
    )
    assert result.returncode == 0, explain(result)
    checkpoints = list((tmp_path / "run" / "checkpoints").glob("ckpt-*-step00000002.pt"))
    assert len(checkpoints) == 1, explain(result)


def test_cifar10_format_trains_one_epoch(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path / "cifar", n_train=64, n_test=16)
    result = run_single(
        [
            "--config",
            "configs/cifar10_resnet32.yaml",
            f"data.root={tmp_path / 'cifar'}",
            "data.batch_size=16",
            "training.epochs=1",
            f"logging.dir={tmp_path / 'run'}",
            "logging.tensorboard=false",
        ]
    )
    assert result.returncode == 0, explain(result)
    assert 0.0 <= final_accuracy(result.stdout) <= 1.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainning.epochs=2", "trainning"),
        ("training.epochs=two", "training.epochs"),
        ("kfac.damping=-1", "kfac.damping"),
    ],
)
def test_config_errors_stop_every_rank_with_one_message(tmp_path: Path, override: str, message: str) -> None:
    # Every rank checks the config before any process group starts and exits with code 2. Guaranteed: the job
    # fails, at least one rank prints the one-line error, none prints a traceback of ours. Not guaranteed:
    # that both print it, since torchrun's agent SIGTERMs the other rank as soon as the first one exits.
    result = run_torchrun([f"logging.dir={tmp_path}", override], timeout=120)
    assert result.returncode != 0, explain(result)
    assert result.stderr.count(f"kfac-dist train: error: override '{override}'") in (1, 2), explain(result)
    assert message in result.stderr and not OUR_TRACEBACK.search(result.stderr), explain(result)


def test_missing_data_directory_is_named_on_every_rank(tmp_path: Path) -> None:
    missing = tmp_path / "no-imagenet-here"
    result = run_torchrun(
        ["--config", "configs/imagenet_resnet50.yaml", f"data.root={missing}", f"logging.dir={tmp_path}"], timeout=120
    )
    assert result.returncode != 0, explain(result)
    # At least one rank names the directory (the first to fail makes torchrun stop the other), without a traceback.
    assert str(missing) in result.stderr and not OUR_TRACEBACK.search(result.stderr), explain(result)


def test_accumulation_and_bf16_autocast_run_under_torchrun(tmp_path: Path) -> None:
    result = run_torchrun(
        [
            f"logging.dir={tmp_path}",
            "training.epochs=1",
            "training.accumulation_steps=2",
            "data.batch_size=16",
            "training.amp=bf16",
        ]
    )
    assert result.returncode == 0, explain(result)
    rows = read_metrics(tmp_path / "metrics.csv")
    assert int(rows[0]["step"]) == 62  # 4,000 / 2 ranks / 16 per micro-batch / 2 micro-batches per step
    assert final_accuracy(result.stdout) > 0.85
