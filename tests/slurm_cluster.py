"""A real single-node Slurm cluster (private munged + slurmctld + slurmd) for tests that submit sbatch scripts.

Mocking `sbatch` cannot show how Slurm really signals, requeues and restarts a batch script, so tests that rely on
that start this throwaway cluster: everything (key, sockets, ports, state, logs) lives under one workdir, the
daemons are children of the test, and they are stopped by PID on exit.  Slurm and MUNGE are apt-installed when
missing (Debian, root).  There is no slurmdbd, so `sacct` is unavailable and job state comes from `scontrol`.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                          "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"})
# A requeued job may start again only after its last run's credential expires: begin time = requeue time +
# cred_expire + 1 s (Slurm's default 120 s; values below 5 are rejected, logged, and the default is used).
CRED_EXPIRE_S = 5
_SBIN = ("/usr/sbin", "/sbin")


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *_SBIN]))


def ensure_slurm_installed() -> None:
    """apt-get install slurm-wlm and munge when slurmctld is missing (root on Debian, as in CI)."""
    if _which("slurmctld") and _which("munged"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("slurmctld/munged are missing and cannot be apt-installed (needs root and apt-get)")
    print("slurm_cluster: installing slurm-wlm and munge with apt-get ...", flush=True)
    subprocess.run("apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm munge", shell=True,
                   check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, stdout=subprocess.DEVNULL)


@dataclass(frozen=True)
class SlurmCluster:
    env: dict[str, str]  # os.environ minus inherited SLURM_* plus SLURM_CONF: pass to every subprocess
    conf: Path
    partition: str
    node: str
    logs: tuple[Path, ...]

    def run(self, *cmd: str, cwd: Path | None = None) -> str:
        proc = subprocess.run(cmd, check=False, env=self.env, cwd=cwd, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def log_tail(self, lines: int = 25) -> str:
        """The last lines of each daemon's output, for error messages."""
        return "\n".join(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
                         for p in self.logs if p.exists() and p.stat().st_size)

    def sbatch(self, script: Path, *args: str, cwd: Path) -> int:
        """Submit `script` (sbatch options in `args` come before it); returns the job id."""
        return int(self.run("sbatch", "--parsable", *args, str(script), cwd=cwd).split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Reason, Restarts, EligibleTime, ...), kept for MinJobAge."""
        line = self.run("scontrol", "show", "job", "--oneliner", str(job_id))
        return dict(tok.split("=", 1) for tok in line.split() if "=" in tok)

    def job_state(self, job_id: int) -> str:
        return self.job_info(job_id)["JobState"]

    def start_now(self, job_id: int) -> None:
        """Make a pending (e.g. requeued) job eligible now rather than CRED_EXPIRE_S + 1 s after the requeue."""
        self.run("scontrol", "update", f"jobid={job_id}", "starttime=now")

    def wait(self, job_id: int, timeout: float = 60.0, until: frozenset[str] = FINAL_STATES) -> str:
        """Poll until the job's state is in `until` (default: a final state); returns that state."""
        deadline, state = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in until:
                return state
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f}s (wanted {sorted(until)}):\n"
                           f"{self.run('scontrol', 'show', 'job', str(job_id))}\n{self.log_tail()}")


def _write_conf(d: Path, node: str, cpus: int, memory_mb: int, partition: str, sock: Path) -> Path:
    with ExitStack() as stack:  # two distinct ports that are free now
        socks = [stack.enter_context(socket.socket()) for _ in range(2)]
        ctld_port, slurmd_port = [s.bind(("127.0.0.1", 0)) or s.getsockname()[1] for s in socks]
    settings = {
        "ClusterName": "caitest", "SlurmctldPort": ctld_port, "SlurmdPort": slurmd_port,
        "SlurmctldHost": f"{node}(127.0.0.1)",  # our short hostname, reached on loopback: no DNS needed
        "SlurmUser": "root", "SlurmdUser": "root", "AuthType": "auth/munge", "CredType": "cred/munge",
        # socket= is read by both auth/munge and cred/munge; cred_expire is the requeue delay (see CRED_EXPIRE_S)
        "AuthInfo": f"socket={sock},cred_expire={CRED_EXPIRE_S}",
        "StateSaveLocation": d / "state", "SlurmdSpoolDir": d / "spool",
        "SlurmctldPidFile": d / "slurmctld.pid", "SlurmdPidFile": d / "slurmd.pid",
        "SlurmctldLogFile": d / "slurmctld.log", "SlurmdLogFile": d / "slurmd.log",
        "PlugStackConfig": d / "plugstack.conf",  # empty: ignore site SPANK plugins in /etc/slurm
        "ProctrackType": "proctrack/linuxproc", "TaskPlugin": "task/none",  # no cgroups in containers
        "JobAcctGatherType": "jobacct_gather/none", "AccountingStorageType": "accounting_storage/none",
        "JobCompType": "jobcomp/none", "MpiDefault": "none", "MailProg": "/bin/true",
        "SelectType": "select/cons_tres", "SelectTypeParameters": "CR_CPU",  # memory not tracked: no --mem needed
        "SlurmdParameters": "config_overrides",  # trust CPUs=/RealMemory= below over the hardware
        "SchedulerType": "sched/backfill", "SchedulerParameters": "sched_interval=1,bf_interval=1",
        "JobRequeue": 1, "ReturnToService": 2, "SlurmdTimeout": 30, "MessageTimeout": 5, "KillWait": 2,
        "InactiveLimit": 0, "MinJobAge": 600,
    }
    lines = [f"{k}={v}" for k, v in settings.items()]
    lines += [f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
              f"PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP"]
    (d / "plugstack.conf").write_text("")
    (d / "slurm.conf").write_text("\n".join(lines) + "\n")
    return d / "slurm.conf"


def _node_name() -> str:
    """The NodeName slurmd believes it has (`slurmd -C`), i.e. the short hostname."""
    out = subprocess.run([_which("slurmd") or "slurmd", "-C"], check=False, capture_output=True, text=True).stdout
    found = re.search(r"NodeName=(\S+)", out)
    return found.group(1) if found else socket.gethostname().split(".")[0]


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    proc.send_signal(signal.SIGTERM)  # a no-op once it has exited; SIGKILL after `timeout`
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def slurm_cluster(workdir: Path, cpus: int = 2, memory_mb: int = 2048,
                  start_timeout: float = 60.0) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd under `workdir`/slurm (recreated) and yield once the node is idle."""
    ensure_slurm_installed()
    d = Path(workdir).resolve() / "slurm"
    shutil.rmtree(d, ignore_errors=True)  # no stale state, pid files or sockets from an earlier run
    for sub in ("state", "spool", "munge"):
        (d / sub).mkdir(parents=True)
    (d / "munge").chmod(0o755)  # munged wants its socket's directory world-executable
    sock, key = d / "munge" / "munge.sock", d / "munge.key"
    if len(str(sock)) > 100:
        raise RuntimeError(f"munge socket path too long for AF_UNIX: {sock}")
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    node, partition = _node_name(), "debug"
    conf = _write_conf(d, node, cpus, memory_mb, partition, sock)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {"SLURM_CONF": str(conf)}
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), *_SBIN])  # jobs inherit both: `scontrol requeue` works
    # --force: munged refuses a socket below a non-world-executable directory, e.g. pytest's tmp_path.  It checks
    # the --pid-file directory even in the foreground (there it logs to stderr, not to --log-file).
    commands = {
        "munged": ["munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
                   f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"],
        "slurmctld": ["slurmctld", "-D", "-f", str(conf)],
        "slurmd": ["slurmd", "-D", "-f", str(conf)],
    }
    logs = tuple(d / f"{name}.out" for name in commands)  # with -D the daemons also log to stderr, from the start
    cluster, procs = SlurmCluster(env, conf, partition, node, logs), dict[str, subprocess.Popen]()

    def poll(ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + start_timeout
        while not ready():
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) waiting for {what}:\n{cluster.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {start_timeout:.0f}s waiting for {what}:\n{cluster.log_tail()}")
            time.sleep(0.2)

    def quiet(*cmd: str) -> str:
        proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=30)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    with ExitStack() as stack:
        for name, cmd in commands.items():
            out = stack.enter_context(open(d / f"{name}.out", "wb"))
            procs[name] = subprocess.Popen(cmd, env=env, cwd=d, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT, start_new_session=True)
            stack.callback(_stop, procs[name])  # LIFO: slurmd, slurmctld, then munged
            if name == "munged":
                poll(sock.exists, "the munge socket")
            elif name == "slurmctld":
                poll(lambda: "UP" in quiet("scontrol", "ping"), "slurmctld to answer")
        poll(lambda: quiet("sinfo", "-h", "-n", node, "-o", "%t") == "idle", f"node {node} to be idle")
        try:
            yield cluster
        finally:  # cancel leftover jobs so that their slurmstepd and scripts do not outlive the daemons
            quiet("scancel", f"--partition={partition}")
            deadline = time.monotonic() + 15
            while quiet("squeue", "-h", "-t", "RUNNING,COMPLETING,CONFIGURING") and time.monotonic() < deadline:
                time.sleep(0.2)
