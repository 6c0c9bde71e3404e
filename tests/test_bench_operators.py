"""``kfac-dist bench operators``: the count is exact, deterministic, and split by kind of step as documented."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.app.bench import main
from kfac_dist.app.bench.operators import KIND_STEPS, OperatorCount, count_step
from kfac_dist.methods import COMPUTE_METHODS


def test_the_count_is_exact() -> None:
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    with OperatorCount() as count:
        torch.mm(a, b).add_(1.0)
    assert dict(count.by_operator) == {"aten.mm": 1, "aten.add_": 1} and count.total == 2


def test_plain_steps_add_no_hook_operators_and_counts_repeat() -> None:
    def steps() -> list[tuple[int, int]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        pre = KFACPreconditioner(model, factor_update_steps=2, inv_update_steps=4)
        batch = torch.randn(6, 5), torch.randint(0, 3, (6,))
        return [tuple(c.total for c in count_step(model, batch, pre)) for _ in range(7)]  # type: ignore[misc]

    first = steps()
    assert first[1:] == steps()[1:]  # deterministic after the process's first step (one-time initialisation)
    backprop_plain, backprop_factor = first[KIND_STEPS["plain"]][0], first[KIND_STEPS["factor"]][0]
    assert backprop_factor > backprop_plain  # the capture hooks run on factor steps only
    assert first[KIND_STEPS["inverse"]][1] > first[KIND_STEPS["factor"]][1] > first[KIND_STEPS["plain"]][1] > 0


def test_the_benchmark_writes_every_kind_of_every_method(tmp_path: Path) -> None:
    assert main(["operators", "--out", str(tmp_path / "ops"), "--no-plot"]) == 0
    results = json.loads((tmp_path / "ops.json").read_text())
    assert set(results["methods"]) == set(COMPUTE_METHODS)
    for kinds in results["methods"].values():
        assert kinds["plain"]["hooks"] == 0 and kinds["factor"]["hooks"] > 0
        for counts in kinds.values():
            assert counts["extra"] == counts["hooks"] + counts["step"]
            assert counts["forward_backward"] == results["sgd_forward_backward"] + counts["hooks"]
    text = (tmp_path / "ops.md").read_text()
    assert "| eigen | plain |" in text and "Commonest operators" in text


def test_the_benchmark_counts_every_rank_of_a_gloo_group(tmp_path: Path) -> None:
    argv = ["operators", "--world-size", "2", "--grad-worker-fraction", "mem-opt", "--batch", "2"]
    assert main([*argv, "--out", str(tmp_path / "ops"), "--no-plot"]) == 0
    results = json.loads((tmp_path / "ops.json").read_text())
    assert results["meta"]["settings"]["world_size"] == 2
    assert results["meta"]["settings"]["grad_worker_fraction"] == "mem-opt"
    for method, kinds in results["methods"].items():
        for kind, counts in kinds.items():
            assert results["max_extra_over_ranks"][method][kind] >= counts["extra"] > 0
    assert "extra, max over ranks" in (tmp_path / "ops.md").read_text()


def test_a_bad_fraction_is_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["operators", "--grad-worker-fraction", "2.5", "--no-plot"])
    assert stop.value.code == 2
    assert "--grad-worker-fraction" in capsys.readouterr().err
