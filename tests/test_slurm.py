"""The Slurm templates of slurm/ and srun, on a real one-node Slurm cluster on loopback (tests/slurm_cluster.py).

Every job is the MNIST-5k run (configs/mnist_cnn.yaml) on 2 CPU tasks, 1 thread each, gloo: the templates are
submitted unchanged, their GPU requests overridden on the sbatch command line (command-line options win over
#SBATCH lines), exactly as a user points them at another config or machine. Each job also gets a Slurm time limit,
and each client command a timeout, so nothing can hang the suite.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest
from slurm_cluster import REPO, SlurmCluster, slurm_cluster_fixture  # noqa: F401  (registers `slurm_cluster`)

from kfac_dist.app.metrics import read_metrics

BIN = Path(sys.executable).parent
SLURM = REPO / "slurm"
MNIST = "configs/mnist_cnn.yaml"
JOB_TIMEOUT_S = 240
#: The CPU test cluster's replacement for a template's resources: 2 tasks of 1 CPU on one node, no GPUs.
CPU_TASKS = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-task=0", "--time=10"]
TEMPLATES = sorted(SLURM.glob("*.sbatch"))
#: The same for the torchrun template: one task (torchrun) of 2 CPUs starting 2 processes (NPROC_PER_NODE=2).
TORCHRUN_TASKS = ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", "--gpus-per-node=0", "--time=10"]


def _tools(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment naming this checkout's executables (the templates' defaults assume REPO/.venv)."""
    return {
        "KFAC_DIST": str(BIN / "kfac-dist"),
        "TORCHRUN": str(BIN / "torchrun"),
        "PYTHON": sys.executable,
        **(extra or {}),
    }


def _explain(result: subprocess.CompletedProcess[str], output: str = "") -> str:
    return (
        f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}"
        f"\n--- job output ---\n{output[-4000:]}"
    )


def sbatch_wait(
    cluster: SlurmCluster,
    template: str,
    out_dir: Path,
    options: Sequence[str] = CPU_TASKS,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], str]:
    """``sbatch --wait`` a template from the repository root; returns sbatch's result and the job's output."""
    output = out_dir / "job-%j.out"
    command = ["sbatch", "--wait", f"--output={output}", *options, str(SLURM / template), *args]
    result = cluster.run(command, timeout=JOB_TIMEOUT_S, env=_tools(env))
    job = re.search(r"Submitted batch job (\d+)", result.stdout)
    text = ""
    if job is not None:
        path = out_dir / f"job-{job.group(1)}.out"
        text = path.read_text(errors="replace") if path.exists() else f"({path} was not written)"
    return result, text


def assert_trained(run_dir: Path, context: str) -> None:
    """One epoch of MNIST-5k on 2 ranks: its metrics row shows learning and K-FAC bytes that travelled."""
    metrics = run_dir / "metrics.csv"
    assert metrics.exists(), f"no {metrics}\n{context}"
    rows = read_metrics(metrics)
    assert [int(row["epoch"]) for row in rows] == [1], context
    assert float(rows[0]["train_loss"]) < 1.2, context  # chance: ln 10 = 2.3; 2 ranks reach 0.65 in epoch 1
    assert float(rows[0]["val_top1"]) > 0.9, context
    assert int(rows[0]["bytes_sent"]) > 0, context  # factors really went between two ranks


def final_accuracy_lines(text: str) -> list[float]:
    return [float(line.split(":")[1]) for line in text.splitlines() if line.startswith("final test accuracy:")]


def test_single_node_template_trains_two_tasks(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result, output = sbatch_wait(
        slurm_cluster, "single_node.sbatch", tmp_path, CPU_TASKS, ["training.epochs=1"],
        {"CONFIG": MNIST, "RUN_DIR": str(run_dir)},
    )  # fmt: skip
    context = _explain(result, output)
    assert result.returncode == 0, context
    assert f"on 1 node(s) {slurm_cluster.node}, 2 task(s)" in output, context
    assert f"master {slurm_cluster.node}:" in output, context  # from scontrol show hostnames
    assert len(final_accuracy_lines(output)) == 1, context  # rank 0 only
    assert_trained(run_dir, context)


def test_srun_two_tasks_without_a_template(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """Plain ``srun -n 2``: kfac_dist/app/env.py finds rank, size and master from Slurm's variables alone."""
    command = [
        "srun", "-n", "2", "--cpus-per-task=1", "--time=10", "--kill-on-bad-exit=1",
        str(BIN / "kfac-dist"), "train", "--config", MNIST, f"logging.dir={tmp_path}", "training.epochs=1",
    ]  # fmt: skip
    result = slurm_cluster.run(command, timeout=JOB_TIMEOUT_S)
    context = _explain(result)
    assert result.returncode == 0, context
    accuracies = final_accuracy_lines(result.stdout)
    assert len(accuracies) == 1 and accuracies[0] > 0.9, context
    assert_trained(tmp_path, context)


def test_multi_node_template_runs_on_one_node(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result, output = sbatch_wait(
        slurm_cluster, "multi_node.sbatch", tmp_path, CPU_TASKS, ["training.epochs=1"],
        {"CONFIG": MNIST, "RUN_DIR": str(run_dir)},
    )  # fmt: skip
    context = _explain(result, output)
    assert result.returncode == 0, context
    assert_trained(run_dir, context)


def test_torchrun_per_node_template_runs(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result, output = sbatch_wait(
        slurm_cluster, "torchrun_per_node.sbatch", tmp_path, TORCHRUN_TASKS,
        ["training.epochs=1"], {"CONFIG": MNIST, "RUN_DIR": str(run_dir), "NPROC_PER_NODE": "2"},
    )  # fmt: skip
    context = _explain(result, output)
    assert result.returncode == 0, context
    assert "torchrun: 1 node(s) x 2 process(es)" in output, context
    assert_trained(run_dir, context)


@pytest.mark.parametrize(
    ("template", "kfac"), [("imagenet_resnet50_kfac.sbatch", True), ("imagenet_resnet50_sgd.sbatch", False)]
)
def test_imagenet_templates_resolve_their_config(
    slurm_cluster: SlurmCluster, tmp_path: Path, template: str, kfac: bool
) -> None:
    """The ImageNet templates' config, DATA_ROOT and RUN_DIR reach every task (shown with --print-config)."""
    options = ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-task=0", "--time=5"]
    data, run_dir = tmp_path / "imagenet", tmp_path / "run"
    result, output = sbatch_wait(
        slurm_cluster, template, tmp_path, options, ["training.epochs=3", "--print-config"],
        {"DATA_ROOT": str(data), "RUN_DIR": str(run_dir)},
    )  # fmt: skip
    context = _explain(result, output)
    assert result.returncode == 0, context
    assert "name: resnet50" in output and "name: imagenet" in output, context
    assert f"root: {data}" in output and f"dir: {run_dir}" in output and "epochs: 3" in output, context
    assert re.search(r"^kfac:\n  enabled: " + ("true" if kfac else "false"), output, re.MULTILINE), context


def test_scaling_sweep_submits_and_summarises(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    env = _tools({"NODE_COUNTS": "1", "CONFIG": MNIST, "SWEEP_DIR": str(sweep)})
    options = ["--wait", f"--output={tmp_path}/job-%j.out", *CPU_TASKS]
    result = slurm_cluster.run([str(SLURM / "scaling_sweep.sh"), *options], timeout=JOB_TIMEOUT_S, env=env)
    outputs = "".join(path.read_text() for path in tmp_path.glob("job-*.out"))
    context = _explain(result, outputs)
    assert result.returncode == 0, context
    assert re.search(r"nodes=1 job=\d+ run_dir=", result.stdout), context
    assert_trained(sweep / "nodes-1", context)
    summary = slurm_cluster.run([str(SLURM / "scaling_sweep.sh"), "--summary"], timeout=60, env=env)
    assert summary.returncode == 0, _explain(summary)
    assert re.search(r"^\s+1\s+\d+\.\d+\s+\d+\.\d+", summary.stdout, re.MULTILINE), _explain(summary)


def test_scaling_sweep_dry_run_lists_one_job_per_node_count(tmp_path: Path) -> None:
    """Needs no cluster: DRY_RUN=1 prints the sbatch commands."""
    env = {**os.environ, "DRY_RUN": "1", "SWEEP_DIR": str(tmp_path), "NODE_COUNTS": "1 2 4 8"}
    result = subprocess.run(
        [str(SLURM / "scaling_sweep.sh"), "-p", "gpu", "--", "training.amp=bf16"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, _explain(result)
    lines = result.stdout.splitlines()
    assert len(lines) == 4, _explain(result)
    for nodes, line in zip((1, 2, 4, 8), lines, strict=True):
        assert f"RUN_DIR={tmp_path}/nodes-{nodes} " in line and f"--nodes={nodes} " in line, line
        assert line.endswith("slurm/multi_node.sbatch training.epochs=1 checkpoint.resume=none training.amp=bf16")
        assert " -p gpu " in line, line
    assert not list(tmp_path.iterdir())  # nothing submitted, nothing created


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"CONFIG": MNIST}, ["kfac.dampng=1"], "kfac.dampng: unknown key; did you mean 'kfac.damping'?"),
        ({"CONFIG": "configs/no_such_run.yaml"}, [], "config 'configs/no_such_run.yaml' not found"),
    ],
)
def test_bad_config_fails_the_job_with_its_message(
    slurm_cluster: SlurmCluster, tmp_path: Path, env: dict[str, str], args: list[str], message: str
) -> None:
    result, output = sbatch_wait(
        slurm_cluster, "single_node.sbatch", tmp_path, CPU_TASKS, args, {**env, "RUN_DIR": str(tmp_path / "run")}
    )
    context = _explain(result, output)
    assert result.returncode != 0, context
    assert message in output, context
    assert not (tmp_path / "run" / "metrics.csv").exists(), context


@pytest.mark.parametrize("script", [*TEMPLATES, SLURM / "lib.sh", SLURM / "scaling_sweep.sh"], ids=lambda p: p.name)
def test_scripts_parse_and_pass_shellcheck(script: Path) -> None:
    """bash -n always; shellcheck too where it is installed (apt-get install shellcheck)."""
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", "-x", str(script)], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_templates_request_gpus_and_leave_account_to_the_user(template: Path) -> None:
    directives = [line.split()[1] for line in template.read_text().splitlines() if line.startswith("#SBATCH ")]
    names = {directive.split("=")[0] for directive in directives}
    assert {"--nodes", "--cpus-per-task", "--time", "--output"} <= names, directives
    assert names & {"--gpus-per-task", "--gpus-per-node"}, directives  # one process per GPU
    assert not names & {"--account", "--partition"}, directives  # commented out (##SBATCH) until a user sets them


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_templates_checkpoint_and_requeue_before_the_time_limit(template: Path) -> None:
    directives = [line.split()[1] for line in template.read_text().splitlines() if line.startswith("#SBATCH ")]
    assert {"--requeue", "--open-mode=append"} <= set(directives), directives
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", directive) for directive in directives), directives


@pytest.mark.parametrize(
    ("template", "options", "code"),
    [
        ("single_node.sbatch", CPU_TASKS, 75),  # srun's exit code is the ranks'
        ("torchrun_per_node.sbatch", TORCHRUN_TASKS, 1),  # torchrun exits with 1 after a signal
    ],
)
def test_time_limit_notice_checkpoints_requeues_and_resumes(
    slurm_cluster: SlurmCluster, tmp_path: Path, template: str, options: list[str], code: int
) -> None:
    """What ``#SBATCH --signal=B:USR1@120`` does ahead of the time limit, sent by hand once training is under way
    (scancel --signal=USR1 --batch): every rank checkpoints and stops, the batch script requeues the job, and the
    requeued job resumes and finishes. Slurm delays a requeued job by AuthInfo's cred_expire (the test cluster's
    10 s; starting it sooner fails it: the first run's credential is revoked). (Not ``sbatch --wait``: it may
    return when the job is requeued.)"""
    run_dir = tmp_path / "run"
    command = ["sbatch", "--parsable", f"--output={tmp_path}/job-%j.out", *options, str(SLURM / template)]
    command += ["training.epochs=2", "training.log_every_steps=5"]
    env = {"CONFIG": MNIST, "RUN_DIR": str(run_dir), "NPROC_PER_NODE": "2"}
    submit = slurm_cluster.run(command, timeout=60, env=_tools(env))
    assert submit.returncode == 0, _explain(submit)
    job = submit.stdout.strip().split(";")[0]
    output = tmp_path / f"job-{job}.out"
    deadline = time.monotonic() + JOB_TIMEOUT_S

    def text() -> str:
        return output.read_text(errors="replace") if output.exists() else ""

    def state() -> str:
        return slurm_cluster.run(["scontrol", "show", "job", job], timeout=30).stdout

    def wait_until(what: str, done: Callable[[], object]) -> None:
        while not done():
            assert time.monotonic() < deadline, f"waiting for {what}\n{state()}\n{text()[-4000:]}"
            time.sleep(0.5)

    finished = r"JobState=(COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY)"
    try:
        wait_until("rank 0's log line at step 5", lambda: " step 5/" in text())
        notice = slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job], timeout=30)
        assert notice.returncode == 0, _explain(notice)
        wait_until("the job to be requeued", lambda: re.search(r"JobState=PENDING .*Restarts=1 ", state(), re.DOTALL))
        wait_until("the requeued job to end", lambda: re.search(finished, state()))
        final = state()
    finally:
        slurm_cluster.run(["scancel", job], timeout=30)  # a no-op for a finished job
    context = f"{final}\n--- job output ---\n{text()[-4000:]}\n{slurm_cluster.logs()}"
    assert "JobState=COMPLETED" in final and "ExitCode=0:0" in final, context
    stopped = r"stopped by SIGUSR1 on 2 of 2 ranks after step \d+, checkpoint written; exit code 75"
    assert re.search(stopped, text()), context
    assert f"step ended with exit code {code} after the time-limit notice: requeueing job {job}" in text(), context
    assert "resumed from" in text(), context  # lib.sh adds checkpoint.resume=auto to a requeued job
    assert len(final_accuracy_lines(text())) == 1, context
    assert [int(row["epoch"]) for row in read_metrics(run_dir / "metrics.csv")] == [1, 2], context
