#!/usr/bin/env python3
"""Remote backup benchmark: the same domain backed up locally and over qemu+ssh with NBD over TLS.

Not a test: prints ratios against the local run measured in the same round (paired rounds, medians).
The "remote" is this host through the remote lab (scripts/lab/remote, started if needed): what is
measured is the cost of ssh, TCP and TLS, not of a network.

    .venv/bin/python bench/bench_remote.py [--size 2G] [--data 768M] [--rounds 3]

  * full over qemu+ssh + TLS / the same full over qemu:///system   (target <= 1.5); beside it the
    same with --no-tls, and nbdcopy of one export over TLS / over a unix socket (what TLS alone costs)
  * fixed cost of a remote inc with no changes, start to exit      (target <= 2 s), with the ssh
    round trips it made (the summary's remote.ssh_round_trips) and the local inc for comparison
  * restore of the last full here / onto the "remote" (ssh forward; and with --nbd-ip: direct TLS)
  Every figure comes with the CPU time (user+sys) of the command and its children and the load.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_backup import Bench, make_raw, parse_size  # noqa: E402

from tests.lab import remote_lab  # noqa: E402
from tests.lab.libvirt_lab import DiskSpec, LabDomain, make_lab_dir  # noqa: E402
from virtnbd.virt import xmlbuild  # noqa: E402

MiB = 1 << 20
FULL_TARGET = 1.5
INC_TARGET = 2.0


def remote_args(lab: remote_lab.RemoteLab) -> list[str]:
    return ["-U", lab.uri(), "--tls-cert", str(lab.client_tls), "--ssh-known-hosts", str(lab.known_hosts)]


def nbdcopy_floor(dom: LabDomain, lab: remote_lab.RemoteLab) -> float:
    """nbdcopy of the same export over TLS (TCP, localhost) / over a unix socket: what TLS alone costs here."""
    times = []
    for kind in ("unix", "tls"):
        port = _free_port()
        server = (xmlbuild.TcpServer("localhost", port) if kind == "tls" else str(dom.socket_path("floor")))
        scratch = dom.dir / f"floor-{kind}.scratch"
        dom.dom.backupBegin(xmlbuild.backup_xml(server, [xmlbuild.BackupDisk("sda", str(scratch))]), None, 0)
        url = (f"nbds://localhost:{port}/sda?tls-certificates={lab.client_tls}" if kind == "tls"
               else f"nbd+unix:///sda?socket={server}")
        try:
            started = time.monotonic()
            subprocess.run(["nbdcopy", url, "null:"], check=True)
            times.append(time.monotonic() - started)
        finally:
            dom.dom.abortJob()
            time.sleep(0.5)
    return times[1] / times[0]


def timed(bench: Bench, cpu: list[float], *args: object) -> tuple[float, dict, int]:
    """bench.backup, and the CPU time (user+sys) of the run and its children appended to ``cpu``."""
    before = os.times()
    result = bench.backup(*args)  # type: ignore[arg-type]
    after = os.times()
    cpu.append(round(after.children_user + after.children_system - before.children_user - before.children_system, 3))
    return result


def restore_pair(work: Path, folder: Path, lab: remote_lab.RemoteLab) -> dict[str, float]:
    """Wall and CPU seconds of restoring ``folder`` here and onto the "remote" (ssh forward, TLS)."""
    result: dict[str, float] = {}
    for kind, extra in (("local", []), ("remote", [*remote_args(lab), "-n"]),
                        ("remote_nbd_ip", [*remote_args(lab), "-n", "--nbd-ip", "127.0.0.1"])):
        out = work / f"restore-{kind}"
        before = os.times()
        started = time.monotonic()
        subprocess.run([sys.executable, str(REPO / "virtnbdrestore"), "-i", str(folder), "-o", str(out), *extra],
                       check=True, capture_output=True)
        result[f"{kind}_s"] = round(time.monotonic() - started, 3)
        after = os.times()
        result[f"{kind}_cpu_s"] = round(after.children_user + after.children_system - before.children_user
                                        - before.children_system, 3)
        shutil.rmtree(out)
    result["ratio"] = round(result["remote_s"] / result["local_s"], 3)
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=2 << 30)
    p.add_argument("--data", type=parse_size, default=768 * MiB)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    lab = remote_lab.start()
    bench = Bench(args)
    work = make_lab_dir(prefix="bench-remote-")
    results: dict[str, object] = {}
    try:
        raw = Path(work) / "random.raw"
        make_raw(raw, args.size, args.data, "random", seed=3)
        dom = bench.domain([DiskSpec("sda", "sata", "qcow2", args.size)], {"sda": raw})
        raw.unlink()
        ratios, plain, local, remote, floors = [], [], [], [], []
        cpu_local: list[float] = []
        cpu_remote: list[float] = []
        cpu_inc: list[float] = []
        load = [os.getloadavg()[0]]
        for n in range(args.rounds):
            floors.append(nbdcopy_floor(dom, lab))
            t_local, _, _ = timed(bench, cpu_local, dom, "full", Path(work) / f"local{n}")
            t_plain, _, _ = bench.backup(dom, "full", Path(work) / f"plain{n}", *remote_args(lab), "--no-tls")
            t_remote, summary, _ = timed(bench, cpu_remote, dom, "full", Path(work) / f"remote{n}", *remote_args(lab))
            load.append(os.getloadavg()[0])
            local.append(round(t_local, 3))
            remote.append(round(t_remote, 3))
            ratios.append(t_remote / t_local)
            plain.append(t_plain / t_local)
            shutil.rmtree(Path(work) / f"local{n}")
            shutil.rmtree(Path(work) / f"plain{n}")
        results["full_remote_tls"] = {"ratio_median": round(statistics.median(ratios), 3),
                                      "ratios": [round(r, 3) for r in ratios], "local_s": local, "remote_s": remote,
                                      "no_tls_ratio_median": round(statistics.median(plain), 3),
                                      "nbdcopy_tls_over_unix_median": round(statistics.median(floors), 3),
                                      "cpu_local_s": cpu_local, "cpu_remote_s": cpu_remote,
                                      "load1": [round(v, 2) for v in load],
                                      "target": FULL_TARGET, "nbd": summary["remote"]["nbd"]}
        last = Path(work) / f"remote{args.rounds - 1}"
        results["restore_full"] = restore_pair(Path(work), last, lab)
        incs, trips, local_incs = [], [], []
        for _ in range(args.rounds):
            t_inc, summary, _ = timed(bench, cpu_inc, dom, "inc", last, *remote_args(lab))
            incs.append(round(t_inc, 3))
            trips.append(summary["remote"]["ssh_round_trips"])
        local_chain = Path(work) / "local-chain"       # local reference, after the remote chain: its full
        bench.backup(dom, "full", local_chain)           # starts a new chain (the remote one ends here)
        for _ in range(args.rounds):
            local_incs.append(round(bench.backup(dom, "inc", local_chain)[0], 3))
        results["inc_no_change_remote"] = {"seconds_median": statistics.median(incs), "seconds": incs,
                                           "ssh_round_trips": trips, "target_s": INC_TARGET,
                                           "cpu_s": cpu_inc, "load1": round(os.getloadavg()[0], 2),
                                           "local_inc_s": local_incs}
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))
    full = results["full_remote_tls"]["ratio_median"]                              # type: ignore[index]
    inc = results["inc_no_change_remote"]["seconds_median"]                         # type: ignore[index]
    verdict = "ok" if full <= FULL_TARGET else "OVER"
    print(f"full over qemu+ssh+TLS / local: {full:.2f} (target <= {FULL_TARGET}) {verdict}")
    print(f"remote inc, no change: {inc:.2f} s (target <= {INC_TARGET} s) {'ok' if inc <= INC_TARGET else 'OVER'}")
    return 0 if full <= FULL_TARGET and inc <= INC_TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
