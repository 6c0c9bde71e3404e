"""``kfac-dist plan`` with ``--config`` (the run's schedule and options, flags over config over defaults), with a user's
``--model module:function``, world sizes from the launcher's environment, one-line errors, and the numbers that
docs/distributed.md quotes."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kfac_dist.app.cli import main
from kfac_dist.options import KFACOptions
from kfac_dist.planner import plan_model

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = str(ROOT / "configs" / "imagenet_resnet50.yaml")
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "HOROVOD_", "MPI_LOCAL")
LAUNCHER_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")

USER_MODULE = """
import torch
from torch import nn


def build(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3, groups=2), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, num_classes))


def lazy() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))


def fixed() -> nn.Module:
    return nn.Linear(4, 2)


def not_a_module():
    return 3


def broken():
    raise RuntimeError("no weights here")
"""


@pytest.fixture(autouse=True)
def no_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No launcher variables: the world size comes from --world-size unless a test sets them."""
    for key in list(os.environ):
        if key in LAUNCHER_NAMES or key.startswith(LAUNCHER_PREFIXES):
            monkeypatch.delenv(key)


def plan_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[dict[str, Any], str]:
    """``kfac-dist plan ARGV --json``: the report and stderr (notes)."""
    assert main(["plan", *argv, "--json"]) == 0
    out = capsys.readouterr()
    return json.loads(out.out), out.err


def plan_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """``kfac-dist plan ARGV`` that fails: exit code 2 and one line on stderr."""
    with pytest.raises(SystemExit) as info:
        raise SystemExit(main(["plan", *argv]))
    assert info.value.code == 2
    out = capsys.readouterr()
    assert out.out == ""
    return out.err.strip().splitlines()[-1]


def numbers(data: dict[str, Any]) -> dict[str, Any]:
    """Everything the plan computed (the model's name aside)."""
    return {k: v for k, v in data.items() if k != "model"}


# ------------------------------------------------------------------------------------------------ --config
def test_config_plans_the_runs_schedule_and_equals_the_explicit_flags(capsys: pytest.CaptureFixture[str]) -> None:
    for extra in ([], ["--grad-worker-fraction", "0.5"]):
        from_config, notes = plan_json(capsys, "--config", IMAGENET, "--world-size", "64", *extra)
        schedule = ["--factor-update-steps", "10", "--inv-update-steps", "100"]
        explicit, _ = plan_json(capsys, "--model", "resnet50", "--world-size", "64", *schedule, *extra)
        assert from_config == explicit
        assert from_config["options"]["factor_update_steps"] == 10 and from_config["options"]["inv_update_steps"] == 100
        assert notes == ""
    every_step, _ = plan_json(capsys, "--model", "resnet50", "--world-size", "64", "--grad-worker-fraction", "0.5")
    half = from_config["summary"]  # the last one: grad_worker_fraction 0.5
    assert every_step["summary"]["amortised_max"] > 6 * half["amortised_max"]  # 1,423 vs 215 MiB per step
    assert every_step["memory"] == from_config["memory"]  # the schedule changes traffic, not memory


def test_flags_override_the_config_and_overrides_apply(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--config", IMAGENET, "--world-size", "8"]
    data, _ = plan_json(capsys, *base, "kfac.inv_update_steps=50", "--inv-update-steps", "20", "kfac.inv_dtype=float64")
    assert data["options"]["inv_update_steps"] == 20  # the flag wins over the override
    assert data["options"]["inv_bytes"] == 8 and data["options"]["factor_bytes"] == 4
    data, _ = plan_json(
        capsys, *base, "kfac.inv_update_steps=50", "kfac.skip_layers=[fc]", "kfac.factor_comm=allreduce"
    )
    assert data["options"]["inv_update_steps"] == 50 and data["options"]["factor_update_steps"] == 10
    assert data["options"]["skip_layers"] == ["fc"] and len(data["layers"]) == 53
    assert data["options"]["factor_comm"] == "allreduce"
    data, _ = plan_json(capsys, *base, "kfac.skip_layers=[fc]", "--skip-layers", "conv1", "--dtype-bytes", "2")
    assert data["options"]["skip_layers"] == ["conv1"]
    assert {data["options"][f"{k}_bytes"] for k in ("factor", "inv", "grad")} == {2}


def test_config_model_section_num_classes_and_width(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--config", IMAGENET, "--world-size", "4"]
    data, _ = plan_json(capsys, *base)
    assert data["layers"][-1]["g_side"] == 1000  # model.num_classes: null -> the model's default
    data, _ = plan_json(capsys, *base, "model.num_classes=100", "model.width_multiplier=0.5")
    wide, _ = plan_json(capsys, *base, "model.num_classes=100")
    assert data["layers"][-1]["g_side"] == wide["layers"][-1]["g_side"] == 100
    assert data["layers"][-1]["a_side"] < wide["layers"][-1]["a_side"]
    data, _ = plan_json(capsys, *base, "--num-classes", "10", "--model", "resnet18")
    assert data["model"] == "resnet18" and data["layers"][-1]["g_side"] == 10 and len(data["layers"]) == 21


def test_schedules_and_a_disabled_kfac_section_are_noted(capsys: pytest.CaptureFixture[str]) -> None:
    schedule = "kfac.inv_update_steps_schedule={milestones: [25], values: [1000]}"
    data, notes = plan_json(capsys, "--config", IMAGENET, "--world-size", "8", schedule, "kfac.enabled=false")
    assert data["options"]["inv_update_steps"] == 100  # the value at step 0
    assert "kfac.inv_update_steps has a schedule (1000 from epoch 25)" in notes and "--inv-update-steps" in notes
    assert "kfac.enabled=false" in notes


# ------------------------------------------------------------------------------------------------ world size
def test_world_size_from_the_launchers_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_NTASKS", "16")  # an sbatch script's shell: no step, one process
    data, notes = plan_json(capsys, "--model", "mlp")
    assert data["world_size"] == 16 and "world size 16 from SLURM_NTASKS" in notes
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("RANK", "0")
    data, notes = plan_json(capsys, "--model", "mlp")
    assert data["world_size"] == 6 and "torchrun" in notes
    data, notes = plan_json(capsys, "--model", "mlp", "--world-size", "3")
    assert data["world_size"] == 3 and notes == ""
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS", "many")
    assert "SLURM_NTASKS" in plan_error(capsys, "--model", "mlp")


# ------------------------------------------------------------------------------------------------ user models
@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """A module of user models in a fresh current directory; its name is unique to the test."""
    name = "user_models_" + re.sub(r"\W", "_", request.node.name)
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def test_user_model_equals_plan_model_on_the_same_model(capsys: pytest.CaptureFixture[str], user_module: str) -> None:
    options = ["--grad-worker-fraction", "0.5", "--factor-update-steps", "2", "--inv-update-steps", "6"]
    data, _ = plan_json(capsys, "--model", f"{user_module}:build", "--world-size", "4", "--num-classes", "7", *options)
    module = sys.modules[user_module]
    planned = KFACOptions(grad_worker_fraction=0.5, factor_update_steps=2, inv_update_steps=6)
    expected = plan_model(module.build(num_classes=7), 4, planned)
    assert data["model"] == f"{user_module}:build"
    assert numbers(data) == numbers(json.loads(json.dumps(expected.to_dict())))
    assert [layer["g_side"] for layer in data["layers"]] == [8, 8, 32, 7]
    assert data["layers"][1]["blocks"] == 2  # the grouped convolution


def test_user_model_with_lazy_layers_needs_an_input_shape(
    capsys: pytest.CaptureFixture[str], user_module: str, tmp_path: Path
) -> None:
    spec = f"{user_module}:lazy"
    error = plan_error(capsys, "--model", spec, "--world-size", "2")
    assert error.startswith("kfac-dist plan: error: --input-shape is required") and spec in error
    data, _ = plan_json(capsys, "--model", spec, "--world-size", "2", "--input-shape", "3,6,6")
    assert data["layers"][-1]["a_side"] == 4 * 4 * 4 + 1
    error = plan_error(capsys, "--model", spec, "--world-size", "2", "--input-shape", "3,2,2")
    assert "--input-shape 3,2,2: the forward pass" in error and "Kernel size" in error

    shaped = f"{user_module}_shaped"
    (tmp_path / f"{shaped}.py").write_text(USER_MODULE + "\nINPUT_SHAPE = (3, 8, 8)\n")
    try:
        data, _ = plan_json(capsys, "--model", f"{shaped}:lazy", "--world-size", "2")
        assert data["layers"][-1]["a_side"] == 4 * 6 * 6 + 1
    finally:
        sys.modules.pop(shaped, None)


def test_user_model_through_the_console_script(user_module: str, tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("kfac-dist")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "kfac_dist.app.cli"]
    argv = [*command, "plan", "--model", f"{user_module}:build", "--world-size", "3", "--json"]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_NAMES and not k.startswith(LAUNCHER_PREFIXES)}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["world_size"] == 3 and len(data["layers"]) == 4


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--model", "{m}_missing:build"], "--model {m}_missing:build: cannot import module '{m}_missing'"),
        (["--model", "{m}:nope"], "--model {m}:nope: module '{m}' ("),
        (["--model", "{m}:not_a_module"], "--model {m}:not_a_module: not_a_module() returned int, not an nn.Module"),
        (["--model", "{m}:broken"], "--model {m}:broken: broken() on the meta device raised RuntimeError: no weights"),
        (["--model", "{m}:fixed", "--num-classes", "3"], "--model {m}:fixed: fixed() takes no num_classes argument"),
        (["--model", "{m}:"], "--model '{m}:': expected module:function"),
        (["--model", "resnet9000"], "--model must be one of small_cnn"),
        (["--model", "{m}:build", "--input-shape", "3,x"], "argument --input-shape: expected comma-separated"),
        (["--model", "{m}:build", "--input-shape", "0,4"], "argument --input-shape: expected comma-separated"),
        (["--model", "mlp", "kfac.damping=1"], "key.path=value overrides need --config"),
        (["--config", IMAGENET, "kfac.nope=1"], "kfac.nope"),
        (["--config", "no/such.yaml"], "no/such.yaml"),
        ([], "--model is required"),
    ],
)
def test_bad_inputs_are_one_line_errors_naming_the_option(
    capsys: pytest.CaptureFixture[str], user_module: str, argv: list[str], expected: str
) -> None:
    argv = [a.replace("{m}", user_module) for a in argv]
    assert expected.replace("{m}", user_module) in plan_error(capsys, *argv, "--world-size", "2")


def test_missing_world_size_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--world-size is required" in plan_error(capsys, "--model", "resnet50")


def test_bad_input_shape_in_the_module(capsys: pytest.CaptureFixture[str], user_module: str, tmp_path: Path) -> None:
    bad = f"{user_module}_bad_shape"
    (tmp_path / f"{bad}.py").write_text(USER_MODULE + "\nINPUT_SHAPE = (3, -1)\n")
    try:
        error = plan_error(capsys, "--model", f"{bad}:build", "--world-size", "2")
    finally:
        sys.modules.pop(bad, None)
    assert f"{bad}.INPUT_SHAPE must be a tuple of integers >= 1; got (3, -1)" in error


def test_meta_device_allocates_nothing(capsys: pytest.CaptureFixture[str], user_module: str) -> None:
    from kfac_dist.app.plan import build_planned_model

    model = build_planned_model(f"{user_module}:build", {"num_classes": 5})
    assert isinstance(model, nn.Module) and {p.device for p in model.parameters()} == {torch.device("meta")}


# ------------------------------------------------------------------------------------------------ the docs
def mib(value: float) -> str:
    return f"{value / 2**20:,.2f}"


def step_max(data: dict[str, Any], kind: str) -> str:
    """The largest per-rank traffic of one kind of step, or "none" when the schedule has no such step."""
    traffic = [sum(c["sent"] + c["received"] for c in r.values()) for r in data["bytes"][kind]]
    return mib(max(traffic)) if data["steps_per_period"][kind] else "none"


def test_the_numbers_docs_distributed_quotes(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [line for line in (ROOT / "docs" / "distributed.md").read_text().splitlines() if line.startswith("| `kfac")]
    assert len(rows) == 3
    for row in rows:
        command, memory, plain, inverse, amortised = (cell.strip() for cell in row.strip("|").split("|"))
        argv = shlex.split(command.split("`")[1])[2:]
        data, _ = plan_json(capsys, *[str(ROOT / a) if a.startswith("configs/") else a for a in argv])
        s = data["summary"]
        assert memory == f"{mib(s['memory_max'])} ({mib(s['kaisa_memory_max'])})", command
        assert amortised == f"{mib(s['amortised_max'])} ({mib(s['kaisa_amortised_max'])})", command
        assert (plain, inverse) == (step_max(data, "plain"), step_max(data, "inverse")), command
