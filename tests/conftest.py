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


def _export(model_dir, tiers_file, out, **options):
    from export.artifacts import ExportOptions, export_all
    from export.backbone import load_backbone
    from export.tiers import load_tiers

    return export_all(load_backbone(str(model_dir)), load_tiers(tiers_file),
                      ExportOptions(out_dir=out, labels=LABELS, probe_steps=2, **options), progress=lambda _: None)


@pytest.fixture(scope="session")
def tiny_export(tiny_model_dir, tiny_tiers_file, tmp_path_factory):
    """The manifest of a full `export_all` of the tiny model with two tiers."""
    return _export(tiny_model_dir, tiny_tiers_file, tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="session")
def tiny_lora_export(tiny_model_dir, tiny_tiers_file, tmp_path_factory):
    """The same two tiers exported with LoRA adapters (ranks 2 and 4) for the baselines."""
    return _export(tiny_model_dir, tiny_tiers_file, tmp_path_factory.mktemp("lora-export"), method="lora")
