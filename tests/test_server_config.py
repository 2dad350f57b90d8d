"""The server's named recipes: a recipe's settings go under the TOML file and the flags, apply to the LoRA
baselines only where they mean something, and a bad one is refused with the choices."""

from __future__ import annotations

import pytest

from broker_server.config import ServerConfigError, load_server_config

LABEL_AWARE = {"logit_prior": 1.0, "own_labels_only": True, "head_weighting": "labels", "router_lr": 0.0}


def _settings(config) -> dict:
    return {k: getattr(config, k) for k in LABEL_AWARE}


def test_the_paper_recipe_is_the_default_and_sets_nothing():
    config = load_server_config(None, {"artifacts": "a"})
    assert config.recipe == "paper"
    assert _settings(config) == {"logit_prior": 0.0, "own_labels_only": False, "head_weighting": "samples",
                                 "router_lr": 1.0}


def test_a_recipe_from_the_file_goes_under_the_files_own_keys_and_the_flags(tmp_path):
    toml = tmp_path / "server.toml"
    toml.write_text('artifacts = "a"\nrecipe = "label-aware"\nlogit_prior = 0.5\n')
    assert _settings(load_server_config(toml, {})) == {**LABEL_AWARE, "logit_prior": 0.5}
    assert load_server_config(toml, {"router_lr": 1.0}).router_lr == 1.0
    assert _settings(load_server_config(None, {"artifacts": "a", "recipe": "label-aware"})) == LABEL_AWARE


def test_a_lora_baseline_takes_the_recipe_without_the_router_step():
    config = load_server_config(None, {"artifacts": "a", "recipe": "label-aware", "method": "fedit"})
    assert _settings(config) == {**LABEL_AWARE, "router_lr": 1.0}


def test_an_unknown_recipe_is_refused_with_the_choices():
    with pytest.raises(ServerConfigError, match="recipe must be one of paper, label-aware"):
        load_server_config(None, {"artifacts": "a", "recipe": "fast"})


def test_a_conflict_the_recipe_causes_says_which_setting_the_recipe_made():
    with pytest.raises(ServerConfigError, match=r"router_lr applies to the fedavg optimizer only \(recipe "
                                                r"'label-aware' sets .*router_lr = 0.0; set one explicitly"):
        load_server_config(None, {"artifacts": "a", "recipe": "label-aware", "optimizer": "fedadam"})
    config = load_server_config(None, {"artifacts": "a", "recipe": "label-aware", "optimizer": "fedadam",
                                       "router_lr": 1.0})
    assert config.optimizer == "fedadam" and config.head_weighting == "labels"
