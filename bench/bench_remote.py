#!/usr/bin/env python3
"""Remote backup benchmark: the same domain backed up locally and over qemu+ssh with NBD over TLS.

Not a test: prints ratios against the local run measured in the same round (paired rounds, medians).
The "remote" is this host through the remote lab (scripts/lab/remote, started if needed): what is
measured is the cost of ssh, TCP and TLS, not of a network.

    .venv/bin/python bench/bench_remote.py [--size 2G] [--data 768M] [--rounds 3]

  * full over qemu+ssh + TLS / the same full over qemu:///system   (target <= 1.5)
  * fixed cost of a remote inc with no changes, start to exit      (target <= 2 s), with the ssh
    round trips it made (the summary's remote.ssh_round_trips) and the local inc for comparison
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_backup import Bench, make_raw, parse_size  # noqa: E402

from tests.lab import remote_lab  # noqa: E402
from tests.lab.libvirt_lab import DiskSpec, make_lab_dir  # noqa: E402

MiB = 1 << 20
FULL_TARGET = 1.5
INC_TARGET = 2.0


def remote_args(lab: remote_lab.RemoteLab) -> list[str]:
    return ["-U", lab.uri(), "--tls-cert", str(lab.client_tls), "--ssh-known-hosts", str(lab.known_hosts)]


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
        ratios, local, remote = [], [], []
        for n in range(args.rounds):
            t_local, _, _ = bench.backup(dom, "full", Path(work) / f"local{n}")
            t_remote, summary, _ = bench.backup(dom, "full", Path(work) / f"remote{n}", *remote_args(lab))
            local.append(t_local)
            remote.append(t_remote)
            ratios.append(t_remote / t_local)
            shutil.rmtree(Path(work) / f"local{n}")
        results["full_remote_tls"] = {"ratio_median": round(statistics.median(ratios), 3),
                                      "ratios": [round(r, 3) for r in ratios], "local_s": local, "remote_s": remote,
                                      "target": FULL_TARGET, "nbd": summary["remote"]["nbd"]}
        last = Path(work) / f"remote{args.rounds - 1}"
        incs, trips, local_incs = [], [], []
        for _ in range(args.rounds):
            t_inc, summary, _ = bench.backup(dom, "inc", last, *remote_args(lab))
            incs.append(round(t_inc, 3))
            trips.append(summary["remote"]["ssh_round_trips"])
        local_chain = Path(work) / "local-chain"       # local reference, after the remote chain: its full
        bench.backup(dom, "full", local_chain)           # starts a new chain (the remote one ends here)
        for _ in range(args.rounds):
            local_incs.append(round(bench.backup(dom, "inc", local_chain)[0], 3))
        results["inc_no_change_remote"] = {"seconds_median": statistics.median(incs), "seconds": incs,
                                           "ssh_round_trips": trips, "target_s": INC_TARGET,
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
