"""Shared fixtures: a tiny BERT folder and one export of it, made once per test session."""

from __future__ import annotations

import pytest

from tests.tiny_model import LABELS, TINY_TIERS, make_tiny_bert


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    pytest.importorskip("torch", reason="the export extra is not installed")
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_tiers_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiers") / "tiers.toml"
    path.write_text(TINY_TIERS)
    return path


@pytest.fixture(scope="session")
def tiny_export(tiny_model_dir, tiny_tiers_file, tmp_path_factory):
    """The manifest of a full `export_all` of the tiny model with two tiers."""
    from export.artifacts import ExportOptions, export_all
    from export.backbone import load_backbone
    from export.tiers import load_tiers

    out = tmp_path_factory.mktemp("export")
    return export_all(load_backbone(str(tiny_model_dir)), load_tiers(tiny_tiers_file),
                      ExportOptions(out_dir=out, labels=LABELS, probe_steps=2), progress=lambda _: None)
