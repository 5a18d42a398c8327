"""The demo's resumable work folder: reused only when it was made with the same settings."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from factorllm_ds.errors import UserError
from factorllm_ds.pipeline import SETTINGS_FILE, DemoConfig, _reset_if_settings_changed


def test_same_settings_keep_the_stages(tmp_path):
    work = tmp_path / "demo"
    cfg = DemoConfig(work=work)
    _reset_if_settings_changed(work, cfg)
    (work / "moe").mkdir()
    _reset_if_settings_changed(work, DemoConfig(work=work, fresh=True))  # --fresh/--work are not settings
    assert (work / "moe").is_dir()
    assert json.loads((work / SETTINGS_FILE).read_text())["split"] == cfg.split


def test_changed_settings_start_over(tmp_path, capsys):
    work = tmp_path / "demo"
    _reset_if_settings_changed(work, DemoConfig(work=work))
    (work / "moe").mkdir()
    changed = dataclasses.replace(DemoConfig(work=work), split="kmeans", lr=2e-4)
    _reset_if_settings_changed(work, changed)
    assert not (work / "moe").exists()
    assert "other settings (lr, split)" in capsys.readouterr().err
    assert json.loads((work / SETTINGS_FILE).read_text())["split"] == "kmeans"


def test_folder_of_an_older_version_starts_over(tmp_path):
    work = tmp_path / "demo"
    (work / "moe").mkdir(parents=True)
    (work / "summary.json").write_text("{}")
    _reset_if_settings_changed(work, DemoConfig(work=work))
    assert sorted(p.name for p in work.iterdir()) == [SETTINGS_FILE]


def test_foreign_folder_is_refused_and_kept(tmp_path):
    work = tmp_path / "mine"
    work.mkdir()
    (work / "thesis.tex").write_text("keep me")
    with pytest.raises(UserError, match="--work .*thesis.tex.*empty or new folder"):
        _reset_if_settings_changed(work, DemoConfig(work=work))
    assert (work / "thesis.tex").read_text() == "keep me"


@pytest.mark.parametrize("flags,message", [
    (dict(distill_weight=1.5), "--distill-weight 1.5: must be a number in [0, 1]"),
    (dict(num_experts=24, ep_size=5), "--ep-size 5 must divide --num-experts (24)"),
    (dict(lr=0.0), "--lr 0.0: must be > 0"),
])
def test_bad_demo_flags_are_refused(flags, message):
    with pytest.raises(UserError, match=re.escape(message)):
        DemoConfig(**flags).validate()
