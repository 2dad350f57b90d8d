"""Device profiles: built-ins load and cite their sources, validation names file and key, tier mapping,
link time, host calibration and its cache, and the `fftmoe profiles` command."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.manifest import MANIFEST_SCHEMA, FileEntry, Manifest, ParamEntry, TierEntry
from hw_profiles import profiles as hp
from hw_profiles.cli import citations

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("pi-zero-2w", "pi3b-plus", "pi4-2gb", "pi4-4gb", "pi5-8gb", "jetson-nano", "orin-nano", "agx-orin",
            "laptop")
NUMERIC = ("cpu_cores", "cpu_ghz", "ram_mb", "os_reserved_mb", "core_gflops", "uplink_mbps", "downlink_mbps",
           "latency_ms", "availability")
SOURCE_WORDS = re.compile(r"estimate|product brief|spec|data ?sheet|product page|openblas|geerlingguy|see \w+",
                          re.IGNORECASE)
# The README's measured tiers (2 threads on the export host), with trainable counts growing nano -> large.
README_TIERS = {"nano": (235.0, 105.5, 1_000), "small": (251.0, 103.1, 2_000), "medium": (359.0, 154.4, 4_000),
                "large": (558.0, 227.0, 8_000)}


def uncited_keys(text: str) -> list[str]:
    """Numeric keys whose line has no `#` comment and whose line above is not a comment (or says nothing
    that looks like a source)."""
    lines = text.splitlines()
    bad = []
    for i, line in enumerate(lines):
        match = re.match(r"\s*(\w+)\s*=\s*([^#]*)(#.*)?$", line)
        if not match or match.group(1) not in NUMERIC:
            continue
        block = [match.group(3) or ""]
        j = i - 1
        while j >= 0 and lines[j].lstrip().startswith("#"):
            block.append(lines[j])
            j -= 1
        if not (match.group(3) or lines[i - 1].lstrip().startswith("#")) or not SOURCE_WORDS.search(" ".join(block)):
            bad.append(match.group(1))
    return bad


def make_tier(name: str, rss: float | None, step_ms: float, params: int, threads: int = 2) -> TierEntry:
    measured = {"step_ms": step_ms, "threads": threads} | ({} if rss is None else {"peak_rss_mb": rss})
    return TierEntry(name=name, experts_held=2, top_k=1, adapted_layers=(5,), seq_len=128, batch_size=8,
                     params=(ParamEntry(f"lora_{name}", (params,), "float32", None, None),), files={},
                     measured=measured)


def make_manifest(tiers: dict, root: Path = Path(".")) -> Manifest:
    return Manifest(schema=MANIFEST_SCHEMA, backbone={"id": "fake"}, labels=("a", "b"), experts=8, rank=16,
                    global_params=(), train_inputs=(), train_outputs=(), infer_inputs=(), infer_outputs=(),
                    tiers={n: make_tier(n, *v) for n, v in tiers.items()},
                    global_init=FileEntry("global_init.npz", "0" * 64, 0), versions={}, root=root)


@pytest.fixture
def device() -> hp.Profile:
    """A plain profile the tier tests adjust with dataclasses.replace."""
    return hp.Profile(name="dev", description="test device", cpu_cores=4, cpu_ghz=1.5, cpu_model="test",
                      ram_mb=65536, os_reserved_mb=0, core_gflops=10.0, uplink_mbps=25.0, downlink_mbps=30.0,
                      latency_ms=5.0, availability=0.9)


@pytest.fixture
def no_calibration(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("calibration must not run here")
    monkeypatch.setattr(hp, "calibrate_host_core_gflops", refuse)


# --- built-in profiles -------------------------------------------------------------------------------

def test_every_required_profile_loads_by_name():
    names = hp.builtin_names()
    assert set(REQUIRED) <= set(names)
    for name in names:
        profile = hp.load_profile(name)
        assert profile.name == name and profile.usable_ram_mb > 0
    ordered = hp.list_profiles()
    assert [p.name for p in ordered] == [p.name for p in sorted(ordered, key=lambda p: p.core_gflops * p.cpu_cores)]
    assert ordered[0].name == "pi-zero-2w"


@pytest.mark.parametrize("name", REQUIRED)
def test_every_numeric_field_cites_a_source_or_says_estimate(name):
    text = (hp.PROFILES_DIR / f"{name}.toml").read_text()
    assert uncited_keys(text) == []
    assert all(re.search(rf"^{k}\s*=", text, re.M) for k in NUMERIC)


def test_citation_check_catches_a_bare_number():
    assert uncited_keys("# Product brief: 4 cores.\ncpu_cores = 4\nram_mb = 512\n") == ["ram_mb"]
    assert uncited_keys("cpu_cores = 4  # estimate\n# a comment naming nothing\nram_mb = 512\n") == ["ram_mb"]


def test_jetson_profiles_say_the_gpu_is_unused():
    for name in ("jetson-nano", "orin-nano", "agx-orin"):
        header, sources = citations(hp.load_profile(name))
        assert any("GPU is NOT used" in line for line in header), name
        assert sources["core_gflops"], name


# --- validation ----------------------------------------------------------------------------------

BASE = (hp.PROFILES_DIR / "pi4-4gb.toml").read_text()


@pytest.mark.parametrize("edit, message", [
    (lambda t: t + "gpu_cores = 128\n", "unknown key 'gpu_cores'"),
    (lambda t: re.sub(r"(?m)^latency_ms = .*\n", "", t), "missing key 'latency_ms'"),
    (lambda t: t.replace("cpu_cores = 4", 'cpu_cores = "four"'), "key 'cpu_cores' must be an integer"),
    (lambda t: t.replace("ram_mb = 4096", "ram_mb = 4096.5"), "key 'ram_mb' must be an integer"),
    (lambda t: t.replace("availability = 0.93", "availability = true"), "key 'availability' must be a finite number"),
    (lambda t: t.replace("uplink_mbps = 80.0", "uplink_mbps = nan"), "key 'uplink_mbps' must be a finite number"),
    (lambda t: t.replace("availability = 0.93", "availability = 0"), "key 'availability' must be in (0, 1]"),
    (lambda t: t.replace("availability = 0.93", "availability = 1.5"), "key 'availability' must be in (0, 1]"),
    (lambda t: t.replace("core_gflops = 7.5", "core_gflops = -7.5"), "key 'core_gflops' must be positive"),
    (lambda t: t.replace("os_reserved_mb = 300", "os_reserved_mb = 5000"),
     "key 'os_reserved_mb' must be >= 0 and below"),
    (lambda t: t.replace("latency_ms = 2.0", "latency_ms = -1"), "key 'latency_ms' must be >= 0"),
    (lambda t: t.replace('name = "pi4-4gb"', 'name = ""'), "key 'name' must be a non-empty string"),
    (lambda t: t + "this is not toml\n", "not valid TOML"),
])
def test_bad_profile_is_rejected_naming_file_and_key(tmp_path, edit, message):
    path = tmp_path / "bad.toml"
    path.write_text(edit(BASE))
    with pytest.raises(hp.ProfileError) as err:
        hp.load_profile(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_profile_file_by_path_and_boundaries(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(BASE.replace("availability = 0.93", "availability = 1").replace("latency_ms = 2.0",
                                                                                    "latency_ms = 0"))
    profile = hp.load_profile(str(path))
    assert profile.availability == 1.0 and isinstance(profile.availability, float) and profile.latency_ms == 0
    assert profile.source == str(path)


def test_unknown_name_lists_known_profiles():
    with pytest.raises(hp.ProfileError, match=r"unknown profile 'pi9'.*pi4-4gb"):
        hp.load_profile("pi9")


# --- tier mapping --------------------------------------------------------------------------------

def test_memory_limited_device_gets_the_largest_tier_that_fits(device, no_calibration):
    manifest = make_manifest(README_TIERS)
    # (700 - 200) x 0.8 = 400 MB: medium (359) fits, large (558) does not
    tier, reasons = hp.tier_for(dataclasses.replace(device, ram_mb=700, os_reserved_mb=200), manifest)
    assert tier == "medium"
    assert [r.split()[0] for r in reasons] == ["large", "medium", "small", "nano"]
    assert "558 MB > 400 MB" in reasons[0] and "does not fit" in reasons[0]
    assert "359 MB <= 400 MB" in reasons[1] and "chosen" in reasons[1]
    assert hp.tier_for(device, manifest)[0] == "large"
    assert hp.tier_for(dataclasses.replace(device, ram_mb=700, os_reserved_mb=200), manifest, safety=0.5)[0] == "nano"


def test_largest_means_most_trainable_parameters_not_most_memory(device, no_calibration):
    manifest = make_manifest({"wide": (300.0, 100.0, 9_000), "deep": (400.0, 100.0, 10)})
    assert hp.tier_for(device, manifest)[0] == "wide"


def test_time_limited_device_gets_a_smaller_tier(device, no_calibration):
    manifest = make_manifest(README_TIERS)
    # large: 0.227 s x 2 threads x 100 host GFLOPS / (10 GFLOPS x 4 cores) = 1.135 s/step, x 20 = 22.7 s
    assert hp.emulated_step_seconds(device, manifest.tiers["large"], 100.0) == pytest.approx(1.135)
    assert hp.emulated_step_seconds(device, manifest.tiers["large"], 100.0, threads=2) == pytest.approx(2.27)
    tier, reasons = hp.tier_for(device, manifest, round_budget_s=16, host_core_gflops=100.0)
    assert tier == "medium"  # 0.772 s/step x 20 = 15.4 s
    assert "22.7 s > 16 s" in reasons[0] and "15.4 s <= 16 s" in reasons[1]
    assert hp.tier_for(device, manifest, round_budget_s=16, host_core_gflops=100.0, local_steps=10)[0] == "large"
    assert hp.tier_for(device, manifest, round_budget_s=16, host_core_gflops=100.0, threads=2)[0] is None


def test_round_budget_without_host_speed_calibrates(device, monkeypatch):
    monkeypatch.setattr(hp, "calibrate_host_core_gflops", lambda: 100.0)
    assert hp.tier_for(device, make_manifest(README_TIERS), round_budget_s=16)[0] == "medium"


def test_no_tier_fits(device, no_calibration):
    tiny = dataclasses.replace(device, ram_mb=400, os_reserved_mb=200)  # 160 MB budget
    tier, reasons = hp.tier_for(tiny, make_manifest(README_TIERS))
    assert tier is None and len(reasons) == 4 and all("does not fit" in r for r in reasons)
    tier, reasons = hp.tier_for(device, make_manifest({"nano": (None, 100.0, 10)}))
    assert tier is None and "not measured" in reasons[0]
    with pytest.raises(ValueError, match="safety"):
        hp.tier_for(device, make_manifest(README_TIERS), safety=0)


def test_transfer_seconds(device):
    # 5 ms one way; 1 MB = 8 Mbit over 25 Mbit/s up = 0.32 s, over 30 Mbit/s down = 0.2667 s
    assert hp.transfer_seconds(device, 1_000_000, "up") == pytest.approx(0.325)
    assert hp.transfer_seconds(device, 1_000_000, "down") == pytest.approx(0.005 + 8 / 30)
    assert hp.transfer_seconds(device, 0, "up") == pytest.approx(0.005)
    zero, orin = hp.load_profile("pi-zero-2w"), hp.load_profile("agx-orin")
    assert hp.transfer_seconds(zero, 10**6, "up") > hp.transfer_seconds(orin, 10**6, "up")
    with pytest.raises(ValueError, match="direction"):
        hp.transfer_seconds(device, 1, "sideways")


# --- host calibration ----------------------------------------------------------------------------

def test_calibration_is_positive_and_cached_per_host(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    gflops = hp.calibrate_host_core_gflops(seconds=0.1)
    assert gflops > 0
    cache = json.loads((tmp_path / ".cache" / "fftmoe" / "calibration.json").read_text())
    assert cache["hosts"][hp.calibration_key()]["core_gflops"] == gflops
    assert "numpy" in hp.calibration_key()

    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(kwargs["env"])
        return subprocess.CompletedProcess(cmd, 0, stdout='{"core_gflops": 42.0}\n', stderr="")

    monkeypatch.setattr(hp.subprocess, "run", fake_run)
    assert hp.calibrate_host_core_gflops() == gflops and calls == []  # from the cache
    assert hp.calibrate_host_core_gflops(refresh=True) == 42.0
    assert calls[0]["OPENBLAS_NUM_THREADS"] == "1" and calls[0]["OMP_NUM_THREADS"] == "1"
    assert hp.calibrate_host_core_gflops() == 42.0
    (tmp_path / ".cache" / "fftmoe" / "calibration.json").write_text("{not json")
    assert hp.calibrate_host_core_gflops() == 42.0 and len(calls) == 2  # a corrupt cache is measured again


def test_calibration_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(hp.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "boom"))
    with pytest.raises(hp.CalibrationError, match="boom"):
        hp.calibrate_host_core_gflops()


# --- the command ---------------------------------------------------------------------------------

def run_cli(*args, cwd=ROOT, home=None):
    env = dict(os.environ, HOME=str(home or cwd))
    return subprocess.run([sys.executable, "-m", "fftmoe.cli", "profiles", *args], capture_output=True, text=True,
                          cwd=cwd, env=env)


def table_rows(stdout: str) -> dict[str, list[str]]:
    rows = [line.split() for line in stdout.splitlines()[2:] if line.strip()]
    return {row[0]: row for row in rows if row[0] in hp.builtin_names()}


def test_cli_table_maps_every_profile_to_a_tier(tmp_path):
    tiers = dict(README_TIERS, huge=(10.0**6, 500.0, 10**6))  # more parameters than any device can hold
    manifest = make_manifest(tiers, root=tmp_path)
    (tmp_path / "manifest.json").write_text(manifest.to_json())
    done = run_cli("--artifacts", str(tmp_path), "--host-core-gflops", "100", home=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = table_rows(done.stdout)
    assert set(rows) == set(hp.builtin_names())
    for profile in hp.list_profiles():
        expected, _ = hp.tier_for(profile, manifest)
        assert rows[profile.name][-2] == (expected or "none"), profile.name
        assert "huge" not in rows[profile.name]
    assert "host: 100 GFLOPS per core" in done.stdout
    assert not (tmp_path / ".cache").exists()  # a given host speed skips calibration


def test_cli_without_an_export_says_export_first(tmp_path):
    done = run_cli("--host-core-gflops", "100", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert all(row[-2:] == ["first", "-"] for row in table_rows(done.stdout).values())
    assert "run `fftmoe export` to write artifacts/default" in done.stdout


def test_cli_show_prints_fields_sources_and_tier_reasons(tmp_path):
    (tmp_path / "manifest.json").write_text(make_manifest(README_TIERS, root=tmp_path).to_json())
    done = run_cli("show", "pi4-4gb", "--artifacts", str(tmp_path), "--host-core-gflops", "100",
                   "--round-budget", "600", home=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert all(re.search(rf"^  {key}\s", out, re.M) for key in NUMERIC + ("cpu_model",))
    assert "Product brief" in out and "OpenBLAS issue #2230" in out
    profile, manifest = hp.load_profile("pi4-4gb"), make_manifest(README_TIERS)
    tier, reasons = hp.tier_for(profile, manifest, round_budget_s=600, host_core_gflops=100.0)
    assert f"tier: {tier} " in out and all(r in out for r in reasons)
    assert "memory" in reasons[0] and "s/step" in reasons[0]


def test_cli_unknown_profile_is_one_line_and_exit_2():
    done = run_cli("show", "pi9")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "pi4-4gb" in done.stderr and "pi9" in done.stderr


def test_profiles_never_import_torch_or_other_roles():
    code = ("import sys, hw_profiles.cli, hw_profiles.profiles\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'export', 'broker_server'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip() == "[]", done.stderr
