"""`fftmoe bundle`: build a self-contained device bundle (a .tar.gz) for one hardware profile.

  fftmoe bundle --profile pi4-4gb --artifacts artifacts/default --broker mqtts://broker.lan:8883 \
                --credentials creds/ --federation demo --out pi4.tar.gz [--dry-run]

The bundle holds the tier the profile maps to (`profiles.tier_for`, by measured peak RSS): the export's
manifest.json unchanged plus that tier's folder (global_init.npz is the server's, not shipped), a
`device.toml` whose paths are relative to the install folder, the broker credentials if given (mode 0600),
`install.sh`, the `fftmoe-device.service` systemd unit, an fftmoe wheel (built here from the source tree
with `pip wheel --no-deps`, or `--wheel FILE`), optionally the ONNX Runtime training wheel for the device
(`--ort-wheel`), and README.txt. It does not install anything: install.sh does that on the device.
Never imports torch or `export`.

Exit codes: 0 written (or dry run printed); 2 bad usage, unknown profile, no tier fits, bad credentials or
broker URL; 3 artifacts missing or corrupt; 1 the wheel build failed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from string import Template

from edge_runtime.device_config import DeviceConfigError, load_device_config
from edge_runtime.manifest import MANIFEST_NAME, ArtifactIntegrityError, ManifestError, load_manifest, verify_tier
from hw_profiles import profiles as hp

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXIT_WHEEL, EXIT_USAGE, EXIT_ARTIFACTS = 1, 2, 3
TEMPLATES = Path(__file__).resolve().parent / "bundle_files"
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the checkout, when running from one
PACKAGES = ("fftmoe", "export", "edge_runtime", "broker_server", "hw_profiles")
ORT_DIST = "onnxruntime-training-cpu"
# credential -> (file name in the bundle, names looked for in a --credentials folder)
CREDENTIALS = {"ca_file": ("ca.crt", ("ca.crt", "ca.pem")),
               "cert_file": ("client.crt", ("client.crt", "device.crt", "cert.pem", "client.pem")),
               "key_file": ("client.key", ("client.key", "device.key", "key.pem")),
               "password_file": ("password", ("password",))}


class BundleError(ValueError):
    """Bad input to `fftmoe bundle`; `code` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Entry:
    """One file of the bundle: its path inside the bundle folder, where its bytes come from, its mode."""

    name: str
    mode: int
    source: Path | None = None
    data: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else self.source.stat().st_size if self.source else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fftmoe bundle", description="Build a self-contained device bundle: the "
                                     "profile's tier, device.toml, credentials, install.sh, a systemd unit, wheels.",
                                     epilog="Exit codes: 0 written, 1 wheel build failed, 2 bad input, "
                                            "3 artifacts missing or corrupt.")
    parser.add_argument("--profile", required=True, help="hardware profile name (`fftmoe profiles`) or TOML file")
    parser.add_argument("--artifacts", required=True, help="export folder with manifest.json")
    parser.add_argument("--broker", required=True, help="broker URL the device connects to (mqtt:// or mqtts://)")
    parser.add_argument("--out", required=True, help="bundle file to write (.tar.gz)")
    parser.add_argument("--tier", help="ship this tier instead of the one the profile maps to")
    parser.add_argument("--device-id", help="device id (default: the device's host name, set by install.sh)")
    parser.add_argument("--federation", default="default", help="federation name (default 'default')")
    parser.add_argument("--data", default="data/local.csv", help="local data path on the device, relative to the "
                        "install folder or absolute (default data/local.csv)")
    parser.add_argument("--threads", type=int, help="training threads (default: the profile's cores)")
    parser.add_argument("--credentials", metavar="DIR", help="folder with any of ca.crt, client.crt, client.key, "
                        "password, username (a file holding the user name); a device kit of `fftmoe fleet` works")
    for flag, help_ in (("--ca-file", "CA certificate of the broker (TLS)"), ("--cert-file", "client certificate"),
                        ("--key-file", "client key"), ("--password-file", "file holding the broker password")):
        parser.add_argument(flag, help=help_ + " (overrides --credentials)")
    parser.add_argument("--username", help="broker user name (overrides --credentials)")
    parser.add_argument("--wheel", help="use this fftmoe wheel instead of building one from the source tree")
    parser.add_argument("--ort-wheel", help="ship this ONNX Runtime training wheel (e.g. one built for aarch64)")
    parser.add_argument("--dry-run", action="store_true", help="print what would go into the bundle; write nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        entries, notes, wheel = plan(args)
        if args.dry_run:
            built = f"wheels/{wheel.name}" if wheel else f"wheels/fftmoe-*.whl (built from {SOURCE_ROOT})"
            print("\n".join(notes + ["", f"would write {args.out} with:"] + [
                f"  {e.name:<48} {e.size:>10,} B  mode {e.mode:04o}" for e in entries] +
                [f"  {built}", "  wheels/edge-requirements.txt"]))
            return 0
        with tempfile.TemporaryDirectory(prefix="fftmoe-bundle-") as tmp:
            wheel_path = wheel if isinstance(wheel, Path) else build_wheel(Path(tmp))
            entries += [Entry(f"wheels/{wheel_path.name}", 0o644, source=wheel_path),
                        Entry("wheels/edge-requirements.txt", 0o644, data=edge_requirements(wheel_path).encode())]
            write_bundle(Path(args.out), entries)
    except BundleError as err:
        print(f"fftmoe bundle: error: {err}", file=sys.stderr)
        return err.code
    print("\n".join(notes + [f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB, {len(entries)} files)",
                             "on the device: tar xzf BUNDLE && sudo sh */install.sh   (--dry-run shows every step)"]))
    return 0


def plan(args) -> tuple[list[Entry], list[str], Path | None]:
    """The bundle's files (all but the fftmoe wheel), summary lines, and the wheel to ship (None: build one)."""
    try:
        profile = hp.load_profile(args.profile)
    except hp.ProfileError as err:
        raise BundleError(str(err)) from err
    try:
        manifest = load_manifest(args.artifacts)
    except ManifestError as err:
        raise BundleError(str(err), EXIT_ARTIFACTS) from err
    chosen, reasons = hp.tier_for(profile, manifest)
    tier_name = args.tier or chosen
    if tier_name is None:
        raise BundleError(f"profile {profile.name!r} fits no tier of {args.artifacts}:\n  " + "\n  ".join(reasons))
    try:
        tier = verify_tier(manifest, tier_name)
    except ManifestError as err:
        raise BundleError(str(err)) from err
    except ArtifactIntegrityError as err:
        raise BundleError(str(err), EXIT_ARTIFACTS) from err
    notes = [f"profile {profile.name}: tier {tier.name}" + (" (--tier)" if args.tier else "")]
    notes += [f"  {line}" for line in reasons]
    creds, username = credentials(args)
    toml = device_toml(args, profile, tier.name, creds, username)
    entries = [Entry(f"artifacts/{MANIFEST_NAME}", 0o644, source=manifest.root / MANIFEST_NAME)]
    entries += [Entry(f"artifacts/{f.path}", 0o644, source=manifest.root / f.path) for f in tier.files.values()]
    entries += [Entry("device.toml", 0o644, data=toml.encode())]
    entries += [Entry(f"credentials/{CREDENTIALS[key][0]}", 0o600, source=path) for key, path in creds.items()]
    entries += [Entry("install.sh", 0o755, source=TEMPLATES / "install.sh"),
                Entry("fftmoe-device.service", 0o644, source=TEMPLATES / "fftmoe-device.service")]
    ort = None
    if args.ort_wheel:
        ort = Path(args.ort_wheel)
        if not ort.is_file() or not ort.name.startswith("onnxruntime") or ort.suffix != ".whl":
            raise BundleError(f"--ort-wheel {ort}: not an onnxruntime*.whl file")
        entries.append(Entry(f"wheels/{ort.name}", 0o644, source=ort))
    readme = Template((TEMPLATES / "README.txt").read_text(encoding="utf-8")).safe_substitute(
        created=time.strftime("%Y-%m-%d"), profile=profile.name, tier=tier.name, federation=args.federation,
        broker=args.broker, data=args.data,
        ort_note=f" and the ONNX Runtime wheel {ort.name}" if ort else "")
    entries.append(Entry("README.txt", 0o644, data=readme.encode()))
    if args.data.startswith(("/home/", "/root/")):
        notes.append(f"warning: data {args.data} is under /home or /root, which the service cannot read "
                     "(ProtectHome=yes): put it under the install folder's data/")
    notes += ["device.toml:"] + [f"  {line}" for line in toml.strip().splitlines() if not line.startswith("#")]
    if args.wheel:
        wheel = Path(args.wheel)
        if not wheel.is_file() or not wheel.name.startswith("fftmoe-") or wheel.suffix != ".whl":
            raise BundleError(f"--wheel {wheel}: not an fftmoe-*.whl file")
        return entries, notes, wheel
    if not (SOURCE_ROOT / "pyproject.toml").is_file():
        raise BundleError(f"no source tree at {SOURCE_ROOT} to build the fftmoe wheel from: pass --wheel FILE")
    return entries, notes, None


def credentials(args) -> tuple[dict[str, Path], str | None]:
    """Credential files to ship (key -> source file) and the user name, from --credentials DIR and the flags."""
    found: dict[str, Path] = {}
    username = None
    if args.credentials:
        folder = Path(args.credentials)
        if not folder.is_dir():
            raise BundleError(f"--credentials {folder}: not a folder")
        for key, (_, names) in CREDENTIALS.items():
            hits = [folder / n for n in names if (folder / n).is_file()]
            if hits:
                found[key] = hits[0]
        if (folder / "username").is_file():
            username = (folder / "username").read_text(encoding="utf-8").strip()
        elif (folder / "device.toml").is_file():  # a device kit of `fftmoe fleet`: its user name is in there
            username = _toml_key(folder / "device.toml", "username")
        if not found and username is None:
            raise BundleError(f"--credentials {folder}: none of ca.crt, client.crt, client.key, password, username")
    for key in CREDENTIALS:
        if getattr(args, key) is not None:
            found[key] = Path(getattr(args, key))
    username = args.username if args.username is not None else username
    for key, path in found.items():
        if not path.is_file():
            raise BundleError(f"--{key.replace('_', '-')} {path}: no such file")
    from edge_runtime.mqtt import BrokerConfig, BrokerConfigError  # paho: imported only when bundling

    try:
        broker = BrokerConfig.from_url(args.broker)
    except BrokerConfigError as err:
        raise BundleError(str(err)) from err
    if broker.password is not None:
        raise BundleError("the broker URL holds a password: put it in a file and pass --password-file")
    tls_files = sorted(k for k in ("ca_file", "cert_file", "key_file") if k in found)
    if tls_files and not broker.tls:
        raise BundleError(f"{', '.join(tls_files)} given but {args.broker} is plain TCP: use mqtts://host:8883")
    if ("cert_file" in found) != ("key_file" in found):
        raise BundleError("a client certificate needs both --cert-file and --key-file")
    return found, username


def _toml_key(path: Path, key: str) -> str | None:
    try:
        value = tomllib.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise BundleError(f"{path}: unreadable ({err})") from err
    return value if isinstance(value, str) else None


def _toml_value(value) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value)  # JSON strings are TOML basic strings


def device_toml(args, profile: hp.Profile, tier: str, creds: dict[str, Path], username: str | None) -> str:
    """device.toml text (validated by the device's own loader); paths are relative to the install folder."""
    values = {"federation": args.federation, "broker": args.broker, "artifacts": "artifacts", "tier": tier,
              "profile": profile.name, "data": args.data, "state_dir": "state",
              "threads": args.threads or profile.cpu_cores}
    if args.device_id:
        values = {"device_id": args.device_id, **values}
    values.update({key: f"credentials/{CREDENTIALS[key][0]}" for key in creds})
    if username is not None:
        values["username"] = username
    text = ("# fftmoe device configuration, written by `fftmoe bundle`. Relative paths are relative to the\n"
            "# install folder (the service's working directory). install.sh appends device_id when absent.\n"
            + "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "device.toml"
        path.write_text(text, encoding="utf-8")
        try:
            load_device_config(path, {} if args.device_id else {"device_id": "check"})
        except DeviceConfigError as err:
            raise BundleError(str(err).replace(str(path), "device.toml")) from err
    return text


def build_wheel(out: Path) -> Path:
    """Build the fftmoe wheel from a clean copy of the source tree (no stale build/ folder can leak in)."""
    src = out / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (SOURCE_ROOT / name).is_file():
            shutil.copy2(SOURCE_ROOT / name, src / name)
    for package in PACKAGES:
        shutil.copytree(SOURCE_ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", "-w",
           str(out / "dist"), str(src)]
    try:  # the build backend installed here avoids fetching setuptools (offline-friendly)
        import setuptools  # noqa: F401

        cmd.insert(4, "--no-build-isolation")
    except ImportError:
        pass
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    wheels = sorted((out / "dist").glob("fftmoe-*.whl"))
    if done.returncode != 0 or not wheels:
        raise BundleError(f"building the fftmoe wheel failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}", EXIT_WHEEL)
    return wheels[0]


def edge_requirements(wheel: Path) -> str:
    """The wheel's base and `edge` requirements except the ORT training wheel, one per line (install.sh uses
    them when the device's ORT wheel has another distribution name than onnxruntime-training-cpu)."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode("utf-8").splitlines()
    out = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req, _, marker = line[len("Requires-Dist:"):].strip().partition(";")
        marker = marker.strip().replace("'", '"')
        if req.strip().lower().replace("_", "-").startswith(ORT_DIST):
            continue
        if "extra ==" not in marker:
            out.append(f"{req.strip()}; {marker}" if marker else req.strip())
        elif marker == 'extra == "edge"':
            out.append(req.strip())
    return "# fftmoe's base and edge requirements without " + ORT_DIST + "\n" + "\n".join(dict.fromkeys(out)) + "\n"


def write_bundle(out: Path, entries: list[Entry]) -> None:
    """Write the entries under one top folder (named after the file) into a gzip tarball, atomically."""
    top = out.name[:-len(".tar.gz")] if out.name.endswith(".tar.gz") else out.stem
    now = int(time.time())
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tmp, "w:gz") as tar:
            folders = sorted({str(p) for e in entries for p in Path(e.name).parents} - {"."})
            for folder in ["", *folders]:
                info = tarfile.TarInfo(f"{top}/{folder}".rstrip("/"))
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o700 if folder == "credentials" else 0o755, now
                tar.addfile(info)
            for entry in entries:
                data = entry.data if entry.data is not None else entry.source.read_bytes()
                info = tarfile.TarInfo(f"{top}/{entry.name}")
                info.size, info.mode, info.mtime = len(data), entry.mode, now
                tar.addfile(info, io.BytesIO(data))
        tmp.replace(out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise BundleError(f"cannot write {out}: {err.strerror or err}") from err


if __name__ == "__main__":
    sys.exit(main())
