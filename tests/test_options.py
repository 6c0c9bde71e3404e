"""One source of truth for K-FAC's options: KFACOptions' fields are what the preconditioner takes, what the config's
``kfac`` section holds (same defaults, ranges and choices) and what ``kfac-dist plan`` has flags for."""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from kfac_dist import KFACPreconditioner
from kfac_dist.app.config import Config, ConfigError, load_config
from kfac_dist.app.config.schema import KFACConfig
from kfac_dist.app.plan import PLANNED_FIELDS, add_arguments
from kfac_dist.methods import COMPUTE_METHODS
from kfac_dist.options import DTYPES, OPTION_FIELDS, KFACOptions, OptionOverrides


def test_overrides_name_exactly_the_fields() -> None:
    assert set(typing.get_type_hints(OptionOverrides)) == set(OPTION_FIELDS)


def test_every_field_has_a_doc_and_a_valid_default() -> None:
    for name, item in OPTION_FIELDS.items():
        assert item.metadata["doc"].endswith("."), name
        assert item.default is not dataclasses.MISSING, name
    KFACOptions()  # every default passes its own checks


def test_the_config_section_embeds_the_options_with_their_defaults() -> None:
    section = {f.name: f for f in dataclasses.fields(KFACConfig)}
    extras = {"enabled", "damping_schedule", "factor_update_steps_schedule", "inv_update_steps_schedule"}
    assert set(section) == set(OPTION_FIELDS) | extras
    assert Config().kfac.library_options() == KFACOptions()
    for name, item in OPTION_FIELDS.items():
        assert section[name].metadata == item.metadata, name


def test_the_embedded_job_uses_the_library_defaults() -> None:
    assert load_config(None).kfac.library_options() == KFACOptions()


def test_config_errors_come_from_the_same_ranges_and_choices() -> None:
    with pytest.raises(ConfigError, match=r"kfac\.damping: -1 is out of range; allowed: a number in \(0, inf\)"):
        load_config(None, ["kfac.damping=-1"])
    with pytest.raises(ConfigError, match="kfac.compute_method: 'qr' is not one of the choices"):
        load_config(None, ["kfac.compute_method=qr"])
    with pytest.raises(ValueError, match=r"damping must be a number in \(0, inf\); got -1"):
        KFACOptions(damping=-1)
    with pytest.raises(ValueError, match="compute_method must be one of 'eigen', 'inverse', 'eigen_warm'; got 'qr'"):
        KFACOptions(compute_method="qr")


def test_plan_flags_are_generated_from_the_planned_fields() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {action.dest: action for action in parser._actions}
    planned = {item.name for item in PLANNED_FIELDS}
    assert planned == {name for name, item in OPTION_FIELDS.items() if item.metadata["plans"]}
    assert planned <= set(flags)
    assert {"damping", "factor_decay", "kl_clip"}.isdisjoint(flags)  # they change no byte
    assert tuple(flags["compute_method"].choices) == COMPUTE_METHODS
    for name in planned:  # argparse formats help with %, so a doc's % is doubled in it
        assert OPTION_FIELDS[name].metadata["doc"].replace("%", "%%") in (flags[name].help or ""), name
    text = " ".join(parser.format_help().split())  # --help works (a bare % in a doc used to break it)
    assert "steps k with k % factor_update_steps == 0" in text


def test_dtypes_are_names_or_torch_dtypes() -> None:
    assert KFACOptions(inv_dtype=torch.float64) == KFACOptions(inv_dtype="float64")
    assert KFACOptions(factor_dtype=torch.bfloat16).factor_dtype_for(torch.float64) is torch.bfloat16
    assert KFACOptions().factor_dtype_for(torch.bfloat16) is torch.float32  # at least float32
    assert KFACOptions().factor_dtype_for(torch.float64) is torch.float64
    assert KFACOptions().inverse_dtype() is torch.float32 and set(DTYPES) >= {"float32", "float64"}
    with pytest.raises(ValueError, match="inv_dtype must be one of 'float32'"):
        KFACOptions(inv_dtype=torch.float16)


def test_callables_are_read_at_each_step() -> None:
    options = KFACOptions(damping=lambda step: 1.0 if step < 10 else 0.1, inv_update_steps=lambda step: 5)
    assert options.value("damping", 0) == 1.0 and options.value("damping", 10) == 0.1
    assert options.at_step(12).damping == 0.1 and options.at_step(12).inv_update_steps == 5
    with pytest.raises(ValueError, match=r"damping must be a number in \(0, inf\); got 0 \(returned by its callable"):
        KFACOptions(damping=lambda step: 0).value("damping", 3)


def test_preconditioner_takes_an_options_object_or_its_fields() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    by_fields = KFACPreconditioner(model, damping=0.5, inv_update_steps=3)
    by_object = KFACPreconditioner(model, KFACOptions(damping=0.5, inv_update_steps=3))
    overridden = KFACPreconditioner(model, KFACOptions(damping=0.1, inv_update_steps=3), damping=0.5)
    assert by_fields.options == by_object.options == overridden.options
    assert math.isclose(by_fields.options.value("damping", 0), 0.5)
    with pytest.raises(ValueError, match="options must be a KFACOptions; got dict"):
        KFACPreconditioner(model, {"damping": 0.5})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dampng"):
        KFACPreconditioner(model, dampng=0.5)  # type: ignore[call-arg]


def test_the_config_reference_states_the_same_defaults() -> None:
    """docs/configs.md's `kfac` table: each option's default column is KFACOptions' default, as YAML writes it."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "configs.md").read_text()
    table = text.split("### `kfac`", 1)[1].split("\n\n", 2)[1]
    rows = {
        cells[1].strip("` "): cells[3].strip("` ") for cells in (line.split("|") for line in table.splitlines()[2:])
    }
    for name, item in OPTION_FIELDS.items():
        default = item.default
        written = {None: "null", True: "true", False: "false"}.get(default, str(default)) if default != () else "[]"
        assert yaml.safe_load(rows[name]) == yaml.safe_load(written), name
