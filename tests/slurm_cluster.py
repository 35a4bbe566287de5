"""A real, private Slurm cluster on localhost for tests (Debian's slurm-wlm + munge).

Started once per test session in a temporary folder with its own munge socket and config, so it never
touches a system Slurm. Tests that need it use the ``slurm_cluster`` fixture from ``test_slurm.py``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged", "sbatch", "squeue")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free on localhost now (the kernel picks them)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def slurm_available() -> bool:
    return all(shutil.which(b) or Path(b).exists() for b in BINARIES)


class LocalSlurm:
    """Munge, slurmctld and slurmd for one node called ``localhost``, all state under ``root``.

    Each instance takes its own free ports and cluster name, so several can run at once (two
    test runs side by side, or two fixtures in one run).
    """

    def __init__(self, root: Path, cpus: int = 2) -> None:
        self.root = root
        self.cpus = cpus
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.ctld_port, self.slurmd_port = _free_ports(2)
        self.cluster_name = f"hipt{secrets.token_hex(4)}"

    def _write_config(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            "\n".join(
                [
                    f"ClusterName={self.cluster_name}",
                    "SlurmctldHost=localhost",
                    "SlurmUser=root",
                    "AuthType=auth/munge",
                    f"AuthInfo=socket={r}/munge/munge.socket.2,cred_expire=10",
                    "CredType=cred/munge",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core_Memory",
                    "DefMemPerCPU=1000",
                    "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,bf_interval=1",
                    "ReturnToService=2",
                    f"StateSaveLocation={r}/state",
                    f"SlurmdSpoolDir={r}/spool",
                    f"SlurmctldPidFile={r}/run/slurmctld.pid",
                    f"SlurmdPidFile={r}/run/slurmd.pid",
                    f"SlurmctldLogFile={r}/log/slurmctld.log",
                    f"SlurmdLogFile={r}/log/slurmd.log",
                    f"SlurmctldPort={self.ctld_port}",
                    f"SlurmdPort={self.slurmd_port}",
                    "MpiDefault=none",
                    f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=8000 State=UNKNOWN",
                    "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def start(self) -> None:
        self._write_config()
        self.root.chmod(0o755)  # the munge user must reach its socket folder
        m = self.root / "munge"
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        subprocess.run(["chown", "-R", "munge:munge", str(m)], check=True)
        key.chmod(0o400)
        m.chmod(0o700)
        subprocess.run(
            [
                "runuser", "-u", "munge", "--", "/usr/sbin/munged",
                f"--socket={m}/munge.socket.2", f"--key-file={key}",
                f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                f"--seed-file={m}/munged.seed", "--force",
            ],
            check=True,
        )  # fmt: skip
        subprocess.run(["/usr/sbin/slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        subprocess.run(
            ["/usr/sbin/slurmd", "-f", str(self.conf), "-N", "localhost"], check=True, env=self.env
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            out = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env
            )
            if out.returncode == 0 and out.stdout.strip() in {"idle", "mixed", "allocated"}:
                return
            time.sleep(0.3)
        raise RuntimeError(f"local Slurm did not come up; see {self.root}/log")

    def sbatch(self, *args: str, cwd: Path | None = None, env: dict | None = None) -> str:
        out = subprocess.run(
            ["sbatch", "--parsable", *args],
            capture_output=True, text=True, check=True, cwd=cwd, env={**self.env, **(env or {})},
        )  # fmt: skip
        return out.stdout.strip().split(";")[0]

    def wait(self, job_id: str, timeout_s: float = 300) -> None:
        """Wait until no task of ``job_id`` is pending or running."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            out = subprocess.run(
                ["squeue", "-h", "-j", job_id, "-o", "%i %T"],
                capture_output=True,
                text=True,
                env=self.env,
            )
            if out.returncode == 0 and not out.stdout.strip():
                return
            time.sleep(0.5)
        raise TimeoutError(f"Slurm job {job_id} still running after {timeout_s} s")

    def stop(self) -> None:
        for pid_file in ("run/slurmd.pid", "run/slurmctld.pid", "munge/munged.pid"):
            p = self.root / pid_file
            if p.exists():
                try:
                    os.kill(int(p.read_text().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(0.5)
