"""`fftmoe fleet`: provision a secure fleet for mosquitto (the command line over `fleet.py`).

Subcommands:
  init         a new fleet folder: CA, broker certificate, one credential per device and for the
               aggregator, mosquitto.conf (TLS only, no anonymous access) and a per-user ACL
  add-device   one more device (or a fresh credential for a revoked one)
  revoke       withdraw a device's credential (mosquitto must then reload: kill -HUP its pid)
  list         the fleet's devices and their status

Exit codes: 0 done; 2 bad arguments or an unusable fleet folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fftmoe fleet", description="Provision a secure fleet for mosquitto.",
                                     epilog="Exit codes: 0 done, 2 bad arguments or unusable fleet folder.")
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create a fleet folder: CA, certificates, credentials, ACL, mosquitto.conf")
    init.add_argument("--out", required=True, help="new fleet folder (must not exist or be empty)")
    init.add_argument("--federation", required=True, help="federation name (the devices' and server's --federation)")
    init.add_argument("--devices", default="", help="comma-separated device ids to provision now")
    init.add_argument("--server-host", default="127.0.0.1,localhost",
                      help="comma-separated names and IPs of the broker host, put in its certificate; the first "
                           "is the one clients connect to (default 127.0.0.1,localhost)")
    init.add_argument("--port", type=int, default=8883, help="TLS listener port (default 8883)")
    init.add_argument("--auth", choices=("password", "certificate"), default="password",
                      help="per-device credential: a random password, or a client certificate (default password)")
    init.add_argument("--listen-address", help="address mosquitto binds (default: all interfaces)")
    init.add_argument("--broker-dir", help="where the broker/ folder will be on the broker host, as written in "
                      "mosquitto.conf (default: this fleet folder's broker/)")
    init.add_argument("--broker-user", default="mosquitto",
                      help="user mosquitto drops to when started as root; it must be able to read broker/ "
                           "(default mosquitto, Debian's; 'root' keeps root)")
    init.add_argument("--device-dir", help="where each device kit will be installed on its device, as written in "
                      "device.toml (default: the kit's folder here)")
    add = sub.add_parser("add-device", help="provision one more device")
    add.add_argument("folder", help="fleet folder")
    add.add_argument("device_id")
    revoke = sub.add_parser("revoke", help="withdraw a device's credential")
    revoke.add_argument("folder", help="fleet folder")
    revoke.add_argument("device_id")
    show = sub.add_parser("list", help="list the devices and their status")
    show.add_argument("folder", help="fleet folder")
    return parser


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _reload_hint(record: dict) -> str:
    return (f"reload mosquitto for this to take effect: kill -HUP <mosquitto pid> "
            f"(systemctl reload mosquitto); broker files: {record['broker_dir']}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from broker_server import fleet

    try:
        if args.command == "init":
            record = fleet.init_fleet(args.out, args.federation, _split(args.devices),
                                      server_hosts=_split(args.server_host), port=args.port, auth=args.auth,
                                      listen_address=args.listen_address, broker_dir=args.broker_dir,
                                      broker_user=args.broker_user, device_dir=args.device_dir)
            paths = fleet.FleetPaths(Path(args.out).absolute())
            print(f"fleet {record['federation']!r} ({record['auth']} authentication) in {paths.root}\n"
                  f"  broker:     mosquitto -c {paths.broker / 'mosquitto.conf'}\n"
                  f"  aggregator: fftmoe serve --config {paths.aggregator / 'server.toml'} --artifacts EXPORT "
                  f"--state-dir STATE\n"
                  f"  devices:    {len(record['devices'])} kits in {paths.root / 'devices'} "
                  f"(fftmoe device --config devices/ID/device.toml ...)\n"
                  f"  keep {paths.ca / 'ca.key'} offline: it can admit any device")
        elif args.command == "add-device":
            kit = fleet.add_device(args.folder, args.device_id)
            print(f"device {args.device_id!r}: kit in {kit}\n{_reload_hint(fleet.load_record(args.folder))}")
        elif args.command == "revoke":
            fleet.revoke_device(args.folder, args.device_id)
            record = fleet.load_record(args.folder)
            what = ("ACL block removed, certificate serial added to crl.pem" if record["auth"] == "certificate"
                    else "password line and ACL block removed")
            print(f"device {args.device_id!r} revoked: {what}\n{_reload_hint(record)}")
        else:
            record = fleet.load_record(args.folder)
            print(f"fleet {record['federation']!r}, {record['auth']} authentication, "
                  f"broker {record['server_hosts'][0]}:{record['port']}")
            for device_id, info in sorted(record["devices"].items()):
                print(f"  {device_id:24s} {info['status']:8s} since {info.get('revoked') or info['added']}")
    except fleet.FleetError as err:
        print(f"fftmoe fleet {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
