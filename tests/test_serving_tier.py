"""A serving-only tier: exported with every global expert, served as the global model, never given to a device.

One export of the tiny model whose only device tier holds 2 of the 4 global experts, plus a
serving-only tier holding all 4.
"""

from __future__ import annotations

import numpy as np
import pytest

import hw_profiles.profiles as hp
from broker_server.aggregation import AggregationConfig
from broker_server.methods import make_method
from edge_runtime.doctor import check_artifacts
from edge_runtime.manifest import ManifestError, load_manifest, verify_tier
from export.cli import summary_table
from broker_server.global_model import GlobalModel, describe_serving, largest_training_tier, serving_tier
from tests.conftest import _export
from tests.tiny_model import TINY_TIERS

TIERS = TINY_TIERS[:TINY_TIERS.index("[tiers.big]")] + """
[tiers.serve]
serving_only = true
experts_held = 4
top_k = 2
adapted_layers = 1
seq_len = 16
batch_size = 4
"""


@pytest.fixture(scope="module")
def tiers_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("serving-tiers") / "tiers.toml"
    path.write_text(TIERS)
    return path


@pytest.fixture(scope="module")
def serving_export(tiny_model_dir, tiers_file, tmp_path_factory):
    return load_manifest(_export(tiny_model_dir, tiers_file, tmp_path_factory.mktemp("serving-export")).root)


def test_the_manifest_marks_the_serving_tier(serving_export):
    assert serving_export.tier("serve").serving_only and not serving_export.tier("small").serving_only
    assert list(serving_export.training_tiers) == ["small"]
    assert "serve (serving only)" in summary_table(serving_export)
    assert serving_tier(serving_export) == "serve" and largest_training_tier(serving_export) == "small"
    assert describe_serving(serving_export) == "tier serve (serving only): 4 of 4 experts per layer, 1 layer"


def test_no_device_is_given_the_serving_tier(serving_export):
    roomy = hp.Profile(name="roomy", description="more memory than any tier needs", cpu_cores=8, cpu_ghz=3.0,
                       cpu_model="test", ram_mb=1 << 20, os_reserved_mb=0, core_gflops=50.0, uplink_mbps=100.0,
                       downlink_mbps=100.0, latency_ms=1.0, availability=1.0)
    chosen, reasons = hp.tier_for(roomy, serving_export)
    assert chosen == "small" and not any("serve" in line for line in reasons)
    with pytest.raises(ManifestError, match="tier 'serve' is serving-only.*choose one of: small"):
        verify_tier(serving_export, "serve")  # what a device, a bundle and the trainer check
    check, _ = check_artifacts(str(serving_export.root), "serve")
    assert check.status == "FAIL" and "serving-only" in check.detail


def test_the_served_model_holds_every_global_expert(serving_export):
    method = make_method("fft-moe", serving_export, AggregationConfig(), gamma=1.0)
    with np.load(serving_export.root / serving_export.global_init.path) as init:
        arrays = {name: init[name] + np.float32(0.01) * np.arange(init[name].size, dtype=np.float32).reshape(
            init[name].shape) for name in init.files}  # every expert distinct
    model = GlobalModel(serving_export, None, method, threads=1)
    assert model.trainer.tier.name == "serve"
    model.load(arrays)
    served = model.trainer.get_params()
    stacks = [p.name for p in serving_export.tier("serve").params if p.slot_axis is not None]
    assert stacks
    for name in stacks:
        np.testing.assert_array_equal(served[name], arrays[name])  # all 4 experts, in global order
        assert served[name].shape[0] == serving_export.experts


def test_lora_exports_leave_the_serving_tier_out(tiny_model_dir, tiers_file, tmp_path):
    manifest = _export(tiny_model_dir, tiers_file, tmp_path / "lora", method="lora")
    assert list(manifest.tiers) == ["small"]


def test_device_tiers_pin_the_fleet(tiny_export, serving_export):
    from hw_profiles.fleet import FleetError, parse_fleet
    from hw_profiles.run import assign_tiers, build_parser

    fleet = parse_fleet("pi4-4gb:2")
    chosen = assign_tiers(fleet, tiny_export, build_parser().parse_args([]), host_gflops=100.0)
    assert [tier for _, _, tier in chosen] == ["big", "big"]  # from memory and the round budget
    pinned = assign_tiers(fleet, tiny_export, build_parser().parse_args(["--device-tiers", "small,big"]), 100.0)
    assert [tier for _, _, tier in pinned] == ["small", "big"]
    for text, export, words in (("small", tiny_export, "names 1 tiers for a fleet of 2 devices"),
                                ("small,huge", tiny_export, "dev1 gets unknown tier 'huge'; device tiers of the "
                                                            "export: small, big"),
                                ("serve,small", serving_export, "dev0 gets the serving-only tier 'serve'")):
        with pytest.raises(FleetError, match=words):
            assign_tiers(fleet, export, build_parser().parse_args(["--device-tiers", text]), 100.0)
