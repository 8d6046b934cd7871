"""A throw-away SLURM cluster on loopback for tests: munged, slurmctld and two slurmd (nodes n1, n2).

Everything lives in one temporary directory (config, munge key and socket, state, spool, logs);
every daemon runs in the foreground as a child of the test process and is stopped by its PID.
Both slurmd run on this host (Debian's slurm is built with multiple-slurmd support) with distinct
node names and ports. They run in a private mount namespace whose /etc/hosts maps n1 and n2 to
127.0.0.1, so jobs can use node names as addresses without touching the machine's /etc/hosts.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from dist_workers import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "unshare", "mount"]
NODES = ("n1", "n2")


class Unavailable(RuntimeError):
    """This machine cannot run slurmd; the message says why."""


def ensure_runnable() -> None:
    """Raise ``Unavailable`` unless this machine can run the cluster; installs the packages if needed."""
    install_if_missing()
    ensure_namespaces()


def install_if_missing() -> None:
    """Install Debian's SLURM packages if a binary is missing (needs root and apt-get)."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable(f"SLURM binaries missing and cannot install {PACKAGES} (need root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if run.returncode:
            raise Unavailable(f"{' '.join(cmd)} failed: {run.stderr.strip()[-500:]}")
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        raise Unavailable(f"installed {PACKAGES} but {missing} still missing")


def ensure_namespaces() -> None:
    """The slurmd run in a private mount namespace (see the module docstring); that needs root."""
    run = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True)
    if run.returncode:
        raise Unavailable(f"cannot create a mount namespace for slurmd's /etc/hosts: {run.stderr.strip()}")


SLURM_CONF = """\
ClusterName=sedit-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0,sched_interval=1
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=120
KillWait=10
InactiveLimit=0
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n1_port} CPUs=2 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n2_port} CPUs=2 State=UNKNOWN
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sedit-slurm-"))
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: list[tuple[str, subprocess.Popen]] = []

    # -- set-up -------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        root = self.root
        os.chmod(root, 0o755)  # munged wants every directory above its socket searchable
        for sub, mode in (("munge", 0o755), ("munge-key", 0o700), ("state", 0o755), ("log", 0o755)):
            (root / sub).mkdir(mode=mode)
            os.chmod(root / sub, mode)
        for node in NODES:
            (root / "spool" / node).mkdir(parents=True)
        key = root / "munge-key" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        hosts = root / "hosts"
        hosts.write_text(Path("/etc/hosts").read_text() + f"\n127.0.0.1 {' '.join(NODES)}\n")
        self.conf.write_text(
            SLURM_CONF.format(root=root, ctld_port=free_port(), n1_port=free_port(), n2_port=free_port())
        )

        self._spawn(
            "munged",
            ["munged", "--foreground", f"--socket={root}/munge/munge.socket", f"--key-file={key}",
             f"--pid-file={root}/munged.pid", f"--log-file={root}/log/munged.log", f"--seed-file={root}/munged.seed"],
        )  # fmt: skip
        self._wait(lambda: (root / "munge" / "munge.socket").exists(), 10, "munged socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.scontrol("ping").returncode == 0 and "UP" in self.scontrol("ping").stdout, 20, "ctld")
        for node in NODES:
            # Private mount namespace: /etc/hosts that resolves the node names, for slurmd and its jobs.
            script = f'mount --bind "{hosts}" /etc/hosts && exec slurmd -D -N {node} -f "{self.conf}"'
            self._spawn(f"slurmd-{node}", ["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
        self._wait(self._nodes_idle, timeout, "both nodes idle")
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()
        self.daemons.append((name, proc))

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = [name for name, proc in self.daemons if proc.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}:\n{self.logs()}")

    def _nodes_idle(self) -> bool:
        run = self.run(["sinfo", "-h", "-N", "-o", "%N %T"])
        states = dict(line.split() for line in run.stdout.splitlines())
        return all(states.get(node) == "idle" for node in NODES)

    # -- use ----------------------------------------------------------------------------------

    def run(self, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, env={**self.env, **kwargs.pop("env", {})}, **kwargs)

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return self.run(["scontrol", *args])

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` fields (JobState, ExitCode, Restarts, ...); {} once the job is purged."""
        out = self.scontrol("show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_for(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {self.job(job_id)}\n{self.logs()}")

    def logs(self, tail: int = 1500) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # -- tear-down ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel every job, stop the daemons by PID (slurmd first), remove the directory."""
        if any(name == "slurmctld" and proc.poll() is None for name, proc in self.daemons):
            self.run(["scancel", "--full", "--user", str(os.geteuid())])
            deadline = time.time() + 30
            while time.time() < deadline and self.run(["squeue", "-h", "-t", "R,CG"]).stdout.strip():
                time.sleep(0.3)
        for _, proc in reversed(self.daemons):  # slurmd, slurmctld, then munged
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.daemons.clear()
        shutil.rmtree(self.root, ignore_errors=True)
