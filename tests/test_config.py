"""Run configs: shipped files, validation messages, overrides, safe YAML, schedules and fingerprints."""

import dataclasses
import math
from pathlib import Path

import pytest

from kfac_dist.app.config import (
    DEFAULTS_SOURCE,
    Config,
    ConfigError,
    KFACConfig,
    ModelConfig,
    ScheduleConfig,
    config_fingerprint,
    config_to_dict,
    format_config,
    kfac_hyperparameter,
    learning_rate,
    load_config,
    lr_scale,
)
from kfac_dist.options import KFACOptions

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ------------------------------------------------------------------------------------------------ shipped files
def test_every_documented_config_is_shipped():
    names = {p.name for p in SHIPPED}
    assert names == {
        "mnist_cnn.yaml",
        "imagenet_resnet50.yaml",
        "imagenet_resnet50_sgd.yaml",
        "cifar10_resnet32.yaml",
        "cifar10_resnet32_sgd.yaml",
    }


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    text = format_config(cfg)
    again = load_config(write(tmp_path, text))
    assert again == cfg
    assert format_config(again) == text


def test_defaults_are_mnist_cnn_yaml():
    from_file = load_config(CONFIGS / "mnist_cnn.yaml")
    assert load_config(None) == from_file == Config()
    # Every key is spelled out in the file, so it documents the defaults completely.
    import yaml

    raw = yaml.safe_load((CONFIGS / "mnist_cnn.yaml").read_text())
    assert raw == config_to_dict(Config())
    assert from_file.model.name == "small_cnn" and from_file.data.name == "mnist-5k"
    assert from_file.kfac.enabled


def test_imagenet_kfac_recipe():
    cfg = load_config(CONFIGS / "imagenet_resnet50.yaml")
    assert (cfg.model.name, cfg.data.name, cfg.data.batch_size, cfg.training.epochs) == ("resnet50", "imagenet", 32, 55)
    assert (cfg.optimizer.lr, cfg.optimizer.lr_scaling) == (0.0125, "linear_world_size")
    assert cfg.lr_schedule.warmup_epochs == 5 and cfg.lr_schedule.milestones == (25, 35, 40, 45, 50)
    assert cfg.lr_schedule.gamma == 0.1
    assert (cfg.optimizer.label_smoothing, cfg.optimizer.weight_decay, cfg.optimizer.momentum) == (0.1, 5e-5, 0.9)
    k = cfg.kfac
    assert k.enabled and (k.factor_update_steps, k.inv_update_steps, k.kl_clip) == (10, 100, 0.001)
    # In our factor scale (docs/configs.md), not KAISA's 0.001.
    assert k.damping == 1.0
    # 64 GPUs: 0.0125 x 64 = 0.8 after warm-up, x0.1 per milestone.
    assert learning_rate(cfg, 0.0, 64) == pytest.approx(0.0125)
    assert learning_rate(cfg, 5.0, 64) == pytest.approx(0.8)
    assert learning_rate(cfg, 30.0, 64) == pytest.approx(0.08)
    assert learning_rate(cfg, 54.9, 64) == pytest.approx(0.8e-5)


def test_imagenet_sgd_recipe():
    cfg = load_config(CONFIGS / "imagenet_resnet50_sgd.yaml")
    assert not cfg.kfac.enabled and cfg.training.epochs == 90
    assert cfg.lr_schedule.milestones == (30, 60, 80) and cfg.lr_schedule.warmup_epochs == 5
    assert (cfg.optimizer.lr, cfg.optimizer.lr_scaling, cfg.optimizer.weight_decay) == (0.1, "linear_batch_256", 1e-4)
    # Goyal et al.: 0.1 x kn/256; 64 GPUs x 32 = 2048 -> 0.8, warm-up from 0.1.
    assert lr_scale(cfg, 64) == 8
    assert learning_rate(cfg, 0.0, 64) == pytest.approx(0.1)
    assert learning_rate(cfg, 2.5, 64) == pytest.approx(0.45)
    assert learning_rate(cfg, 85.0, 64) == pytest.approx(0.8e-3)


def test_sgd_baselines_differ_from_kfac_runs_only_where_intended():
    for kfac_name, sgd_name in [
        ("imagenet_resnet50", "imagenet_resnet50_sgd"),
        ("cifar10_resnet32", "cifar10_resnet32_sgd"),
    ]:
        kfac_cfg, sgd_cfg = (load_config(CONFIGS / f"{n}.yaml") for n in (kfac_name, sgd_name))
        assert kfac_cfg.kfac.enabled and not sgd_cfg.kfac.enabled
        assert kfac_cfg.model == sgd_cfg.model and kfac_cfg.data == sgd_cfg.data
        assert config_fingerprint(kfac_cfg) == config_fingerprint(sgd_cfg)
        assert kfac_cfg.logging.dir != sgd_cfg.logging.dir


# --------------------------------------------------------------------------------------------- error messages
def test_unknown_top_level_key_names_file_path_and_suggestion(tmp_path):
    path = write(tmp_path, "seed: 1\nkfca:\n  damping: 0.1\n")
    message = error_of(path)
    assert message.startswith(f"{path}: kfca: unknown key; did you mean 'kfac'?; allowed: seed, model, data")


def test_unknown_nested_key_names_file_path_and_suggestion(tmp_path):
    path = write(tmp_path, "kfac:\n  dampng: 0.1\n")
    message = error_of(path)
    assert message.startswith(f"{path}: kfac.dampng: unknown key; did you mean 'kfac.damping'?; allowed: enabled,")


def test_key_in_the_wrong_section_suggests_where_it_belongs(tmp_path):
    assert "did you mean 'kfac.damping'?" in error_of(write(tmp_path, "damping: 0.1\n"))
    assert "did you mean 'optimizer.lr'?" in error_of(write(tmp_path, "training:\n  lr: 0.1\n"))


@pytest.mark.parametrize(
    ("text", "key", "allowed"),
    [
        ("kfac:\n  damping: abc\n", "kfac.damping", "a number in (0, inf)"),
        ("kfac:\n  kl_clip: '1e-3'\n", "kfac.kl_clip", "a number in (0, inf) or null"),
        ("training:\n  epochs: true\n", "training.epochs", "an integer in [1, inf)"),
        ("training:\n  epochs: 2.5\n", "training.epochs", "an integer in [1, inf)"),
        ("kfac:\n  enabled: 1\n", "kfac.enabled", "true or false"),
        ("kfac:\n  skip_layers: fc\n", "kfac.skip_layers", "a list, each a string"),
        ("model:\n  name: [resnet50]\n", "model.name", "one of 'small_cnn'"),
        ("kfac: null\n", "kfac", "a mapping with keys enabled,"),
        ("logging:\n  dir: 3\n", "logging.dir", "a string"),
    ],
)
def test_wrong_type_names_file_key_and_allowed(tmp_path, text, key, allowed):
    path = write(tmp_path, text)
    message = error_of(path)
    assert message.startswith(f"{path}: {key}: wrong type: "), message
    assert message.split("; allowed: ")[1].startswith(allowed)


@pytest.mark.parametrize(
    ("text", "key", "allowed"),
    [
        ("kfac:\n  damping: 0\n", "kfac.damping", "a number in (0, inf)"),
        ("kfac:\n  factor_decay: 1.0\n", "kfac.factor_decay", "a number in [0, 1)"),
        ("kfac:\n  grad_worker_fraction: 1.5\n", "kfac.grad_worker_fraction", "a number in (0, 1] or one of 'mem-opt'"),
        ("kfac:\n  grad_worker_fraction: fast\n", "kfac.grad_worker_fraction", "or one of 'mem-opt', 'hybrid-opt'"),
        ("kfac:\n  inv_update_steps: 0\n", "kfac.inv_update_steps", "an integer in [1, inf)"),
        ("kfac:\n  compute_method: cholesky\n", "kfac.compute_method", "one of 'eigen', 'inverse', 'eigen_warm'"),
        ("optimizer:\n  momentum: -0.1\n", "optimizer.momentum", "a number in [0, 1)"),
        ("lr_schedule:\n  gamma: 2\n", "lr_schedule.gamma", "a number in (0, 1]"),
        ("lr_schedule:\n  milestones: [10, 0]\n", "lr_schedule.milestones", "a list, each an integer in [1, inf)"),
        ("data:\n  batch_size: 0\n", "data.batch_size", "an integer in [1, inf)"),
        ("seed: -1\n", "seed", "an integer in [0, 4294967296)"),
        ("comm:\n  backend: tcp\n", "comm.backend", "one of 'auto', 'nccl', 'gloo', 'mpi', 'horovod'"),
        ("training:\n  grad_clip: .nan\n", "training.grad_clip", "a number in (0, inf) or null"),
        ("comm:\n  timeout_s: .inf\n", "comm.timeout_s", "a number in [1, 604800]"),
        ("comm:\n  timeout_s: 1e300\n", "comm.timeout_s", "a number in [1, 604800]"),
        ("comm:\n  timeout_s: 1e-6\n", "comm.timeout_s", "a number in [1, 604800]"),
    ],
)
def test_out_of_range_names_file_key_and_allowed(tmp_path, text, key, allowed):
    path = write(tmp_path, text)
    message = error_of(path)
    assert message.startswith(f"{path}: {key}: "), message
    assert "wrong type" not in message
    assert allowed in message.split("; allowed: ")[1]


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("data:\n  name: imagenet\n", "data.root", "needs its data directory"),
        ("data:\n  name: cifar10\n", "data.root", "needs its data directory"),
        ("data:\n  image_size: 224\n  val_resize: 200\n", "data.val_resize", "smaller than image_size"),
        ("lr_schedule:\n  milestones: [30, 20]\n", "lr_schedule.milestones", "not strictly increasing"),
        ("lr_schedule:\n  kind: cosine\n  milestones: [30]\n", "lr_schedule.milestones", "cosine schedule"),
        ("optimizer:\n  lr_scaling: none\nlr_schedule:\n  warmup_epochs: 5\n", "lr_schedule.warmup_epochs", "'none'"),
        ("optimizer:\n  momentum: 0\n  nesterov: true\n", "optimizer.nesterov", "momentum > 0"),
        ("optimizer:\n  betas: [0.9]\n", "optimizer.betas", "1 items"),
        ("model:\n  width_multiplier: 0.5\n", "model.width_multiplier", "ImageNet ResNets"),
        (
            "kfac:\n  damping_schedule: {milestones: [5, 10], values: [0.1]}\n",
            "kfac.damping_schedule.values",
            "1 values",
        ),
        (
            "kfac:\n  damping_schedule: {milestones: [10, 5], values: [1, 2]}\n",
            "kfac.damping_schedule.milestones",
            "not",
        ),
        ("kfac:\n  damping_schedule: {milestones: [], values: []}\n", "kfac.damping_schedule.milestones", "empty"),
        ("kfac:\n  damping_schedule: {milestones: [5]}\n", "kfac.damping_schedule.values", "required"),
        (
            "kfac:\n  inv_update_steps_schedule: {milestones: [5], values: [2.5]}\n",
            "kfac.inv_update_steps_schedule.values",
            "integers",
        ),
        (
            "kfac:\n  damping_schedule: {milestones: [5], values: [-1]}\n",
            "kfac.damping_schedule.values",
            "out of range",
        ),
        ("checkpoint:\n  resume: ''\n", "checkpoint.resume", "empty"),
    ],
)
def test_inconsistent_values_name_file_and_key(tmp_path, text, key, words):
    path = write(tmp_path, text)
    message = error_of(path)
    assert message.startswith(f"{path}: {key}: "), message
    assert words in message


def test_root_is_not_checked_for_existence(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  name: imagenet\n  root: /no/such/dir\n"))
    assert cfg.data.root == "/no/such/dir"


def test_an_int_where_a_float_is_expected_is_a_float(tmp_path):
    cfg = load_config(write(tmp_path, "kfac:\n  damping: 2\n  kl_clip: 1e-3\n"))
    assert cfg.kfac.damping == 2.0 and isinstance(cfg.kfac.damping, float)
    assert cfg.kfac.kl_clip == 0.001  # YAML 1.1 would read 1e-3 as a string


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("kfac:\n  damping: [1\n", "line "),
        ("kfac:\n  damping: 1\n  damping: 2\n", "appears twice"),
        ("- 1\n- 2\n", "expected a mapping of sections"),
    ],
)
def test_bad_yaml_names_the_file(tmp_path, text, words):
    path = write(tmp_path, text)
    message = error_of(path)
    assert message.startswith(f"{path}: ") and words in message


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "missing.yaml"
    assert error_of(path).startswith(f"{path}: file: cannot be read")


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file_is_an_error_naming_it(tmp_path, text):
    path = write(tmp_path, text)
    assert error_of(path) == f"{path}: file: is empty; allowed: a mapping of sections; {{}} for the built-in defaults"
    assert load_config(write(tmp_path, "{}\n")) == Config()  # the defaults, asked for


def test_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("training:\n  epochs: 2  # \u00e9poques\n".encode("latin-1"))
    assert error_of(path).startswith(f"{path}: file: is not UTF-8 text (byte 0xe9 at offset 25)")


@pytest.mark.parametrize(
    "tag",
    [
        '!!python/object/apply:os.system ["touch {marker}"]',
        "!!python/object/new:os.system [touch {marker}]",
        "!!python/name:os.system",
        "!!python/object:pathlib.Path {{}}",
    ],
)
def test_python_tags_are_rejected_without_running_anything(tmp_path, tag):
    marker = tmp_path / "pwned"
    path = write(tmp_path, "kfac:\n  damping: " + tag.format(marker=marker) + "\n")
    message = error_of(path)
    assert message.startswith(f"{path}: line 2, column 12: tag ") and "is not allowed" in message
    assert not marker.exists()
    # The same through an override.
    assert "is not allowed" in error_of(None, ["kfac.damping=" + tag.format(marker=marker)])
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------- overrides
def test_override_values_are_yaml():
    cfg = load_config(
        None,
        [
            "kfac.damping=0.5",
            "kfac.kl_clip=null",
            "kfac.skip_layers=[fc, 'conv*']",
            "kfac.grad_worker_fraction=0.25",
            "training.epochs=2",
            "logging.dir=/tmp/x y",
            "seed = 7",
            "kfac.damping_schedule={milestones: [2], values: [0.1]}",
        ],
    )
    assert cfg.kfac.damping == 0.5 and cfg.kfac.kl_clip is None
    assert cfg.kfac.skip_layers == ("fc", "conv*") and cfg.kfac.grad_worker_fraction == 0.25
    assert cfg.training.epochs == 2 and cfg.logging.dir == "/tmp/x y" and cfg.seed == 7
    assert cfg.kfac.damping_schedule == ScheduleConfig(milestones=(2,), values=(0.1,))


def test_overrides_apply_in_order_and_over_the_file(tmp_path):
    path = write(tmp_path, "kfac:\n  damping: 0.2\n  inv_update_steps: 7\n")
    cfg = load_config(path, ["kfac.damping=0.3", "kfac.damping=0.4"])
    assert cfg.kfac.damping == 0.4 and cfg.kfac.inv_update_steps == 7


def test_mapping_override_sets_only_the_keys_it_names(tmp_path):
    path = write(tmp_path, "kfac:\n  damping_schedule: {milestones: [5], values: [0.5]}\n")
    cfg = load_config(path, ["kfac={damping: 0.2}", "kfac.damping_schedule={values: [0.25]}"])
    assert cfg.kfac.damping == 0.2 and cfg.kfac.inv_update_steps == KFACOptions().inv_update_steps
    assert cfg.kfac.damping_schedule == ScheduleConfig(milestones=(5,), values=(0.25,))


def test_override_can_fill_a_section_the_file_leaves_null(tmp_path):
    path = write(tmp_path, "kfac:\n  damping_schedule: null\n")
    cfg = load_config(path, ["kfac.damping_schedule.milestones=[3]", "kfac.damping_schedule.values=[0.5]"])
    assert cfg.kfac.damping_schedule == ScheduleConfig(milestones=(3,), values=(0.5,))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "kfac.damping=-1",
            "override 'kfac.damping=-1': kfac.damping: -1 is out of range; allowed: a number in (0, inf)",
        ),
        ("kfac.damping=abc", "override 'kfac.damping=abc': kfac.damping: wrong type: 'abc' (a string); allowed: "),
        ("kfac.dampng=1", "override 'kfac.dampng=1': kfac.dampng: unknown key; did you mean 'kfac.damping'?; allowed:"),
        ("kfca.damping=1", "override 'kfca.damping=1': kfca: unknown key; did you mean 'kfac'?"),
        ("seed.value=1", "override 'seed.value=1': seed: is a value, not a section"),
        ("kfac.damping", "override 'kfac.damping': override: 'kfac.damping' is not key.path=value"),
        ("=1", "override '=1': override: '=1' is not key.path=value"),
        (
            "data.name=imagenet",
            "override 'data.name=imagenet': data.root: data set 'imagenet' needs its data directory",
        ),
        ("kfac.damping=[1", "override 'kfac.damping=[1': line 1, column 3: "),
        (
            "kfac.damping_schedule.milestones=[5]",
            "override 'kfac.damping_schedule.milestones=[5]': kfac.damping_schedule.values: is required",
        ),
    ],
)
def test_override_errors_name_the_override(override, message):
    assert error_of(None, [override]).startswith(message)


def test_cross_field_error_names_the_override_that_caused_it(tmp_path):
    path = write(tmp_path, "optimizer:\n  lr_scaling: linear_world_size\nlr_schedule:\n  warmup_epochs: 5\n")
    assert load_config(path).lr_schedule.warmup_epochs == 5
    message = error_of(path, ["optimizer.lr_scaling=none"])
    assert message.startswith("override 'optimizer.lr_scaling=none': lr_schedule.warmup_epochs: ")


def test_file_errors_still_name_the_file_when_overrides_are_given(tmp_path):
    path = write(tmp_path, "kfac:\n  damping: 0\n")
    assert error_of(path, ["training.epochs=2"]).startswith(f"{path}: kfac.damping: ")


def test_defaults_are_named_in_errors():
    assert DEFAULTS_SOURCE == "<built-in defaults>"
    with pytest.raises(ConfigError) as info:
        load_config(None, ["training.epochs=0"])
    assert info.value.source == "override 'training.epochs=0'" and info.value.key == ("training", "epochs")


def test_print_config_output_applies_overrides_and_reloads(tmp_path):
    cfg = load_config(CONFIGS / "imagenet_resnet50.yaml", ["data.root=/datasets/imagenet", "kfac.damping=0.3"])
    text = format_config(cfg)
    assert "root: /datasets/imagenet" in text and "damping: 0.3" in text
    assert load_config(write(tmp_path, text)) == cfg


# ----------------------------------------------------------------------------------------- built in code
def test_sections_validate_when_built_in_code():
    with pytest.raises(ConfigError, match=r"^damping: -1 is out of range; allowed: a number in \(0, inf\)$"):
        KFACConfig(damping=-1)
    with pytest.raises(ConfigError, match="^name: 'resnet51' is not one of the choices"):
        ModelConfig(name="resnet51")
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().seed = 1  # type: ignore[misc]
    assert KFACConfig(skip_layers=["fc"]).skip_layers == ("fc",)  # type: ignore[arg-type]


def test_model_build_kwargs():
    assert ModelConfig(name="resnet50", width_multiplier=0.25).build_kwargs(1000) == {
        "num_classes": 1000,
        "width_multiplier": 0.25,
    }
    assert ModelConfig(name="small_cnn", num_classes=7).build_kwargs(10) == {"num_classes": 7}


def test_checkpoint_dir_defaults_into_the_run_dir():
    assert str(Config().checkpoint_dir()) == "runs/mnist_cnn/checkpoints"
    cfg = load_config(None, ["checkpoint.dir=/ckpt"])
    assert str(cfg.checkpoint_dir()) == "/ckpt"


# ------------------------------------------------------------------------------------------------ schedules
def kaisa_compounding(initial, milestones, alpha, epochs):
    """KAISA's example: every epoch, the current damping is multiplied by alpha^(milestones passed)."""
    value, values = initial, []
    for epoch in range(epochs):
        value *= alpha ** sum(1 for m in milestones if epoch >= m)
        values.append(value)
    return values


def test_kfac_schedule_is_piecewise_constant_never_compounding():
    kfac = load_config(
        None, ["kfac.damping=1.0", "kfac.damping_schedule={milestones: [35, 45], values: [0.5, 0.25]}"]
    ).kfac
    steps_per_epoch = 10
    damping = kfac_hyperparameter(kfac, "damping", steps_per_epoch)
    assert callable(damping)
    expected = {0: 1.0, 349: 1.0, 350: 0.5, 449: 0.5, 450: 0.25, 451: 0.25, 10_000: 0.25}
    # In any order, any number of times: a pure function of the step.
    for step in [*expected, *reversed(expected), *expected]:
        assert damping(step) == expected[step]
    epoch_45 = [damping(s) for s in range(0, 550)][45 * steps_per_epoch]
    assert epoch_45 == 0.25
    # What compounding would give instead (the schedule must not do this).
    assert kaisa_compounding(1.0, [35, 45], 0.5, 46)[45] != 0.25


def test_update_frequency_schedules_are_ints():
    kfac = load_config(
        None,
        [
            "kfac.factor_update_steps=10",
            "kfac.inv_update_steps=10",
            "kfac.factor_update_steps_schedule={milestones: [2], values: [100]}",
            "kfac.inv_update_steps_schedule={milestones: [1, 3], values: [20, 40]}",
        ],
    ).kfac
    factor = kfac_hyperparameter(kfac, "factor_update_steps", 5)
    inverse = kfac_hyperparameter(kfac, "inv_update_steps", 5)
    assert callable(factor) and callable(inverse)
    assert [factor(s) for s in (0, 9, 10, 99)] == [10, 10, 100, 100]
    assert [inverse(s) for s in (0, 4, 5, 14, 15)] == [10, 10, 20, 20, 40]
    assert all(type(inverse(s)) is int for s in range(30))


def test_constant_kfac_options_stay_constants():
    kfac = KFACConfig(damping=0.7, inv_update_steps=50)
    assert kfac_hyperparameter(kfac, "damping", 100) == 0.7
    assert kfac_hyperparameter(kfac, "inv_update_steps", 100) == 50
    with pytest.raises(ValueError, match="kl_clip"):
        kfac_hyperparameter(kfac, "kl_clip", 100)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        kfac_hyperparameter(kfac, "damping", 0)


def test_learning_rate_schedules():
    step = load_config(None, ["optimizer.lr=0.1", "lr_schedule.warmup_epochs=2", "lr_schedule.milestones=[4, 6]"])
    assert [learning_rate(step, e, 4) for e in (0, 1, 2, 3.9, 4, 6, 100)] == pytest.approx(
        [0.1, 0.25, 0.4, 0.4, 0.04, 0.004, 0.004]
    )
    cosine = load_config(
        None, ["optimizer.lr_scaling=none", "lr_schedule.kind=cosine", "training.epochs=10", "optimizer.lr=1"]
    )
    assert [learning_rate(cosine, e, 8) for e in (0, 5, 10, 12)] == pytest.approx([1, 0.5, 0, 0])
    batch = load_config(None, ["optimizer.lr_scaling=linear_batch_256", "training.accumulation_steps=2"])
    assert lr_scale(batch, 8) == 32 * 8 * 2 / 256
    with pytest.raises(ValueError, match="world_size"):
        lr_scale(batch, 0)
    assert math.isclose(learning_rate(Config(), 0, 2), 0.05)


# ---------------------------------------------------------------------------------------------- fingerprint
def test_fingerprint_follows_model_and_data_not_hyperparameters():
    base = Config()
    fingerprint = config_fingerprint(base)
    assert len(fingerprint) == 16 and fingerprint == config_fingerprint(load_config(None))
    same = ["optimizer.lr=0.3", "kfac.damping=5", "training.epochs=9", "data.batch_size=8", "seed=3", "data.workers=2"]
    for override in same:
        assert config_fingerprint(load_config(None, [override])) == fingerprint, override
    for override in ["model.name=mlp", "model.num_classes=12", "data.name=cifar10\ndata.root=/x"]:
        changed = load_config(None, override.split("\n"))
        assert config_fingerprint(changed) != fingerprint, override
    assert config_fingerprint(base, sections=("optimizer",)) != config_fingerprint(
        load_config(None, ["optimizer.lr=0.3"]), sections=("optimizer",)
    )
    with pytest.raises(ValueError, match="'model.nme'"):
        config_fingerprint(base, sections=("model.nme",))


def test_config_error_survives_pickling():
    import pickle

    with pytest.raises(ConfigError) as info:
        load_config(None, ["kfac.damping=0"])
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value) and again.key == ("kfac", "damping") and again.source == info.value.source
