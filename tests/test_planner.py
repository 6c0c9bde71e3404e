"""The planner (``kfac-dist plan``): plausible totals for ResNet-50 at W=64, option checks, and, on real gloo
processes at W = 2 and 4, per-rank bytes and memory exactly equal to what the preconditioner recorded."""

from __future__ import annotations

import inspect
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from multiproc import run_multiproc
from torch import nn

from kfac_dist import KFACPreconditioner, costs
from kfac_dist.app.bench.gloo_runs import bytes_delta, check_against_planner, step_kind
from kfac_dist.app.cli import main
from kfac_dist.app.models import build_model
from kfac_dist.app.plan_text import plan_text
from kfac_dist.comm import TorchDistCommunicator
from kfac_dist.costs import ElementBytes
from kfac_dist.methods import METHODS
from kfac_dist.options import OPTION_FIELDS, KFACOptions
from kfac_dist.placement import Plan, build_plan, compute_cost
from kfac_dist.planner import STEP_KINDS, layer_shapes, plan_model, steps_per_period

RESNET50_ARGS = ["--model", "resnet50", "--world-size", "64", "--grad-worker-fraction", "0.5"]
RESNET50_ARGS += ["--factor-update-steps", "10", "--inv-update-steps", "100"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["plan", *argv]) == 0
    return capsys.readouterr().out


def meta_model(name: str) -> nn.Module:
    """A model of the zoo on the meta device."""
    with torch.device("meta"):
        return build_model(name)


def per_rank_sum(rows: list[dict[str, int]], key: str) -> int:
    return sum(row[key] for row in rows)


# ------------------------------------------------------------------------------------------ ResNet-50, W = 64
@pytest.fixture(scope="module")
def resnet50_shapes() -> tuple[Any, ...]:
    with torch.device("meta"):
        model = build_model("resnet50")
    return layer_shapes(model)


def test_cli_json_resnet50_w64_totals(capsys: pytest.CaptureFixture[str], resnet50_shapes: tuple[Any, ...]) -> None:
    data = json.loads(run_cli(capsys, *RESNET50_ARGS, "--json"))
    shapes = resnet50_shapes
    w, g = 64, 32
    assert data["world_size"] == w and data["plan"]["grad_workers"] == g
    assert len(data["layers"]) == len(shapes) == 54
    assert Plan.from_dict(data["plan"]) == build_plan(list(shapes), w, 0.5)
    assert data["period"] == 100 and data["steps_per_period"] == {
        "factor": 9,
        "inverse": 1,
        "inverse_only": 0,
        "plain": 90,
    }

    factors = sum(costs.factor_storage_numel(s) * 4 for s in shapes)
    factor_payload = sum(costs.factor_comm_numel(s) * 4 for s in shapes)  # packed triangles
    decompositions = sum(METHODS["eigen"].storage_numel(s) * 4 for s in shapes)
    memory, kaisa = data["memory"], data["kaisa"]["memory"]
    assert len(memory) == len(kaisa) == w
    assert per_rank_sum(memory, "factors") == factors  # owner: each layer's factors live on one rank
    assert all(row["factors"] == factors for row in kaisa)  # KAISA: every rank holds every factor
    assert per_rank_sum(memory, "decompositions") == g * decompositions
    assert all(row["buffers"] == factor_payload for row in memory + kaisa)  # every factor-reduction bucket
    assert [row["decompositions"] for row in kaisa] == [row["decompositions"] for row in memory]
    assert max(sum(row.values()) for row in memory) < min(sum(row.values()) for row in kaisa)

    bytes_ = data["bytes"]
    for kind in (*STEP_KINDS, "amortised"):
        assert len(bytes_[kind]) == w
        for category in costs.CATEGORIES:  # every byte sent is received by someone
            sent = sum(r[category]["sent"] for r in bytes_[kind])
            assert sent == pytest.approx(sum(r[category]["received"] for r in bytes_[kind]), rel=1e-12)
    factor_sent = sum(r["factor_reduce"]["sent"] for r in bytes_["factor"])
    assert (w - 1) * factor_payload < factor_sent <= w * factor_payload  # per bucket: (W - 1) n + n - c_owner
    # KAISA's allreduce sends 2 (n - c_p) per rank and bucket: 2 (W - 1) times the payload in all, on 10 of 100
    kaisa_sent = sum(r["factor_reduce"]["sent"] for r in data["kaisa"]["amortised"])
    assert kaisa_sent == pytest.approx(2 * (w - 1) * factor_payload / 10, rel=1e-12)
    assert all(r["factor_reduce"] == {"sent": 0, "received": 0} for r in bytes_["plain"])
    assert all(r["decomposition_broadcast"] == {"sent": 0, "received": 0} for r in bytes_["factor"])
    plan = Plan.from_dict(data["plan"])
    for rank in range(w):
        grads = sum(s.grad_numel * 4 for s in shapes if rank not in plan.layer(s.name).grad_workers)
        assert bytes_["plain"][rank]["gradient_broadcast"]["received"] >= grads  # + the sources' allgather share
        for category in costs.CATEGORIES:
            for d in ("sent", "received"):
                mix = [bytes_[k][rank][category][d] for k in ("factor", "inverse", "plain")]
                expected = (9 * mix[0] + mix[1] + 90 * mix[2]) / 100
                assert bytes_["amortised"][rank][category][d] == pytest.approx(expected, rel=1e-12)

    load = data["decomposition_load"]
    assert sum(load["per_rank"]) == sum(compute_cost(s) for s in shapes)
    assert load["max"] == max(load["per_rank"]) and load["mean"] == pytest.approx(sum(load["per_rank"]) / w)
    summary = data["summary"]
    assert summary["memory_max"] == max(sum(row.values()) for row in memory)
    assert summary["kaisa_memory_mean"] == pytest.approx(factors + factor_payload + g * decompositions / w, rel=1e-12)
    assert summary["kaisa_memory_max"] == max(sum(row.values()) for row in kaisa)


def test_cli_text_resnet50_w64(capsys: pytest.CaptureFixture[str]) -> None:
    text = run_cli(capsys, *RESNET50_ARGS)
    data = json.loads(run_cli(capsys, *RESNET50_ARGS, "--json"))
    lines = text.splitlines()
    assert lines[0].startswith("kfac-dist plan: resnet50, 54 preconditioned layers")
    assert "per 100 steps: 9 factor steps, 1 inverse step, 90 plain steps" in text
    rank_rows = [line for line in lines if line.split() and line.split()[0].isdigit()]
    assert rank_rows == []  # 64 ranks: min/mean/max/total only
    for name in ("min", "mean", "max", "total"):
        assert any(line.split()[:1] == [name] for line in lines), name
    kaisa = next(line for line in lines if line.startswith("max memory (MiB)")).split()
    s = data["summary"]
    assert kaisa[-2:] == [f"{s['memory_max'] / 2**20:,.2f}", f"{s['kaisa_memory_max'] / 2**20:,.2f}"]
    amortised = next(line for line in lines if line.startswith("max amortised traffic")).split()
    assert amortised[-2:] == [f"{s['amortised_max'] / 2**20:,.2f}", f"{s['kaisa_amortised_max'] / 2**20:,.2f}"]

    per_rank = run_cli(capsys, *RESNET50_ARGS, "--per-rank")
    rows = [line.split()[0] for line in per_rank.splitlines() if line.split() and line.split()[0].isdigit()]
    assert rows == [str(r) for r in range(64)]


def test_small_world_prints_every_rank(capsys: pytest.CaptureFixture[str]) -> None:
    text = run_cli(capsys, "--model", "small_cnn", "--world-size", "4", "--grad-worker-fraction", "mem-opt")
    rows = [line.split() for line in text.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [row[0] for row in rows] == ["0", "1", "2", "3"]
    assert sum(int(row[1]) for row in rows) == 3  # conv1, conv2, fc owned once each


def test_allreduce_plan_is_kaisa_and_schedule_kinds() -> None:
    options = KFACOptions(factor_comm="allreduce", factor_update_steps=2, inv_update_steps=3, compute_method="inverse")
    report = plan_model(meta_model("mlp"), 3, options)
    assert report.memory == report.kaisa_memory and report.amortised == report.kaisa_amortised
    assert steps_per_period(report.options) == (6, {"factor": 2, "inverse": 1, "inverse_only": 1, "plain": 2})
    assert "1 inverse-only step" in plan_text(report)
    json.dumps(report.to_dict())


def test_the_plan_takes_the_preconditioners_options() -> None:
    """The planner takes the preconditioner's KFACOptions as they are; callables at their values at step 0."""

    def inv_steps(step: int) -> int:
        return 100 if step < 50 else 1000

    options = KFACOptions(
        factor_update_steps=10,
        inv_update_steps=inv_steps,
        damping=0.3,
        inv_dtype=torch.float64,
        grad_worker_fraction="hybrid-opt",
        factor_comm="allreduce",
        skip_layers=("fc",),
    )
    report = plan_model(meta_model("resnet18"), 4, options, name="my run")
    assert report.model == "my run" and len(report.layers) == 20
    assert report.options.inv_update_steps == 100 and report.options.factor_comm == "allreduce"
    assert report.sizes == ElementBytes(factor=4, inv=8, grad=4)
    assert ElementBytes.of(KFACOptions(factor_dtype=torch.bfloat16)).factor == 2
    assert options.at_step(50).inv_update_steps == 1000
    preconditioner = set(inspect.signature(KFACPreconditioner).parameters)
    assert "options" in preconditioner and not set(OPTION_FIELDS) & preconditioner  # taken as **overrides
    planned = {name for name, item in OPTION_FIELDS.items() if item.metadata["plans"]}
    assert {"damping", "factor_decay", "kl_clip"}.isdisjoint(planned)


def test_steps_per_period_counts_every_kind_of_step() -> None:
    for f, i in itertools.product(range(1, 13), repeat=2):
        period, counts = steps_per_period(KFACOptions(factor_update_steps=f, inv_update_steps=i))
        kinds = [(k % f == 0, k % i == 0) for k in range(period)]
        assert period == math.lcm(f, i)
        assert counts == {kind: kinds.count(flags) for kind, flags in STEP_KINDS.items()}


@pytest.mark.parametrize(("name", "layers"), [("resnet18", 21), ("resnet50", 54), ("resnet101", 105)])
def test_model_registry_resnets(name: str, layers: int) -> None:
    report = plan_model(meta_model(name), 8, KFACOptions(grad_worker_fraction="hybrid-opt"), name=name)
    assert len(report.layers) == layers and report.model == name
    assert report.layers[0].name == "conv1" and report.layers[-1].name == "fc"
    assert report.layers[-1].g_side == 1000


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"world_size": 0}, "world_size"),
        ({"world_size": 2.0}, "world_size"),
        ({"grad_worker_fraction": 1.5}, "grad_worker_fraction"),
        ({"grad_worker_fraction": "fast"}, "grad_worker_fraction"),
        ({"assignment": "random"}, "assignment"),
        ({"factor_comm": "ring"}, "factor_comm"),
        ({"symmetric_comm": 1}, "symmetric_comm"),
        ({"compute_method": "cholesky"}, "compute_method"),
        ({"bucket_cap_mb": 0.0}, "bucket_cap_mb"),
        ({"factor_update_steps": 0}, "factor_update_steps"),
        ({"inv_update_steps": 2.5}, "inv_update_steps"),
        ({"factor_bytes": 0}, "factor_bytes"),
        ({"inv_bytes": True}, "inv_bytes"),
        ({"grad_bytes": -4}, "grad_bytes"),
        ({"skip_layers": 3}, "skip_layers"),
        ({"model": "resnet18"}, "model"),
        ({"model": 3}, "model"),
    ],
)
def test_bad_options_raise_value_error_naming_them(kwargs: dict[str, Any], option: str) -> None:
    """Each bad value fails where it is given: KFACOptions, ElementBytes or plan_model (which takes no names)."""
    args: dict[str, Any] = {"model": meta_model("mlp"), "world_size": 2} | kwargs
    with pytest.raises(ValueError, match=option):
        sizes = {k.removesuffix("_bytes"): args.pop(k) for k in list(args) if k.endswith("_bytes")}
        options = KFACOptions(**{k: args.pop(k) for k in list(args) if k in OPTION_FIELDS})
        plan_model(args.pop("model"), args.pop("world_size"), options, sizes=ElementBytes(**sizes))


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--model", "resnet9000", "--world-size", "2"], "--model"),
        (["--model", "mlp", "--world-size", "0"], "--world-size"),
        (["--model", "mlp", "--world-size", "2", "--grad-worker-fraction", "0"], "--grad-worker-fraction"),
        (["--model", "mlp", "--world-size", "2", "--grad-worker-fraction", "x"], "--grad-worker-fraction"),
        (["--model", "mlp", "--world-size", "2", "--factor-comm", "ring"], "--factor-comm"),
        (["--model", "mlp", "--world-size", "2", "--assignment", "x"], "--assignment"),
        (["--model", "mlp", "--world-size", "2", "--compute-method", "x"], "--compute-method"),
        (["--model", "mlp", "--world-size", "2", "--factor-update-steps", "0"], "--factor-update-steps"),
        (["--model", "mlp", "--world-size", "2", "--inv-update-steps", "1.5"], "--inv-update-steps"),
        (["--model", "mlp", "--world-size", "2", "--dtype-bytes", "0"], "--dtype-bytes"),
        (["--model", "mlp", "--world-size", "2", "--grad-bytes", "x"], "--grad-bytes"),
        (["--model", "mlp", "--world-size", "2", "--skip-layers", "*"], "skip"),
    ],
)
def test_cli_bad_values_exit_2_naming_the_flag(capsys: pytest.CaptureFixture[str], argv: list[str], flag: str) -> None:
    with pytest.raises(SystemExit) as info:
        code = main(["plan", *argv])
        raise SystemExit(code)
    assert info.value.code == 2
    assert flag in capsys.readouterr().err


def test_cli_bucket_cap_mb(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--model", "small_cnn", "--world-size", "3", "--json"]
    default = json.loads(run_cli(capsys, *base))
    small = json.loads(run_cli(capsys, *base, "--bucket-cap-mb", "0.001"))
    assert default["options"]["bucket_cap_mb"] == 25.0 and small["options"]["bucket_cap_mb"] == 0.001
    assert small["memory"] == default["memory"]  # the same buckets' bytes, only cut differently
    assert small["bytes"] != default["bytes"]  # more, smaller buckets: chunks round differently
    with pytest.raises(SystemExit):
        main(["plan", *base, "--bucket-cap-mb", "0"])
    assert "--bucket-cap-mb" in capsys.readouterr().err


def test_cli_dtype_bytes_and_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--model", "mlp", "--world-size", "2", "--json"]
    four = json.loads(run_cli(capsys, *base))
    eight = json.loads(run_cli(capsys, *base, "--dtype-bytes", "8", "--grad-bytes", "2"))
    assert eight["options"]["factor_bytes"] == eight["options"]["inv_bytes"] == 8
    assert eight["options"]["grad_bytes"] == 2
    assert eight["memory"][0]["buffers"] == 2 * four["memory"][0]["buffers"]


def test_console_script_plan() -> None:
    script = Path(sys.executable).with_name("kfac-dist")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "kfac_dist.app.cli"]
    argv = [*command, "plan", "--model", "resnet18", "--world-size", "8", "--json"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["world_size"] == 8


# ------------------------------------------------------------------------ planner == real runs (gloo, W = 2, 4)
STEPS = 6  # one period of lcm(2, 3): factor (2, 4), inverse (0), inverse-only (3) and plain (1, 5) steps
FACTOR_UPDATE_STEPS = 2
INV_UPDATE_STEPS = 3
LOCAL_BATCH = 3


class TinyNet(nn.Module):
    """Embedding (diagonal A), grouped Conv1d, two Linears; the last one is skipped by pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.conv = nn.Conv1d(6, 4, 3, groups=2)
        self.hidden = nn.Linear(12, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv(self.embed(tokens).transpose(1, 2)))
        return self.out(torch.relu(self.hidden(x.flatten(1))))


def make_tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().double()


def cases(world_size: int) -> list[dict[str, Any]]:
    uneven = {2: 0.5, 4: 0.75}[world_size]
    return [
        {"grad_worker_fraction": "mem-opt", "compute_method": "eigen", "symmetric_comm": True, "factor_comm": "owner"},
        {
            "grad_worker_fraction": uneven,
            "compute_method": "inverse",
            "symmetric_comm": False,
            "factor_comm": "owner",
            "assignment": "memory",
        },
        {"grad_worker_fraction": 0.5, "compute_method": "eigen", "symmetric_comm": False, "factor_comm": "allreduce"},
        {  # buckets of at most 40 float64 elements: every phase is split into several buckets
            "grad_worker_fraction": "mem-opt",
            "compute_method": "eigen",
            "symmetric_comm": True,
            "factor_comm": "owner",
            "bucket_cap_mb": 40 * 8 / 2**20,
        },
        {
            "grad_worker_fraction": "comm-opt",
            "compute_method": "inverse",
            "symmetric_comm": True,
            "factor_comm": "owner",
        },
    ]


def train_cases(rank: int, world_size: int) -> list[dict[str, Any]]:
    """Every case: STEPS steps of SGD + K-FAC on this rank's slice; what the preconditioner recorded."""
    torch.set_default_dtype(torch.float64)
    out = []
    for options in cases(world_size):
        model = make_tiny()
        pre = KFACPreconditioner(
            model,
            factor_update_steps=FACTOR_UPDATE_STEPS,
            inv_update_steps=INV_UPDATE_STEPS,
            damping=0.05,
            inv_dtype=torch.float64,
            skip_layers=("out",),
            communicator=TorchDistCommunicator(),
            **options,
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        per_step = []
        for step in range(STEPS):
            before = pre.comm_stats()
            generator = torch.Generator().manual_seed(100 * step + rank)
            tokens = torch.randint(0, 12, (LOCAL_BATCH, 5), generator=generator)
            labels = torch.randint(0, 3, (LOCAL_BATCH,), generator=generator)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(tokens), labels).backward()
            for p in model.parameters():
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
            pre.step()
            optimizer.step()
            per_step.append(bytes_delta(before, pre.comm_stats()))
        out.append({"plan": pre.plan().to_dict(), "steps": per_step, "memory": pre.memory_usage()})
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_planner_equals_what_real_runs_recorded(world_size: int) -> None:
    results = run_multiproc(train_cases, world_size, timeout=120)
    assert sorted(step_kind(k, (FACTOR_UPDATE_STEPS, INV_UPDATE_STEPS)) for k in range(STEPS)) == sorted(
        ["inverse", "plain", "factor", "inverse_only", "factor", "plain"]
    )
    for index, options in enumerate(cases(world_size)):
        planned = KFACOptions(
            factor_update_steps=FACTOR_UPDATE_STEPS, inv_update_steps=INV_UPDATE_STEPS, skip_layers=("out",), **options
        )
        report = plan_model(make_tiny(), world_size, planned, sizes=ElementBytes(8, 8, 8))
        assert [s.name for s in report.layers] == ["embed", "conv", "hidden"]
        assert report.layers[0].a_diagonal and report.layers[1].blocks == 2
        # plan, memory and every step's bytes of every rank, exactly (the check ``kfac-dist bench comm`` runs)
        check = check_against_planner([outcomes[index] for outcomes in results], report)
        assert check["equal"], f"W={world_size} {options}: {check['mismatches']}"
        assert check["amortised_equal"] and sum(check["traffic"]) > 0  # STEPS is one period
