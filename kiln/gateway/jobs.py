"""Admin jobs: `kiln reload` / `kiln rollback` run as child processes for the gateway's admin
routes (``admin.py``), recorded as files, so every gateway process that shares the jobs
folder (``--gateway-workers``) answers for every job, and a gateway restart forgets none:

    <jobs>/<id>/job.json     what was asked: model, action, overrides, who, the command, the watcher's pid
    <jobs>/<id>/spec.yaml    the spec the child reloads
    <jobs>/<id>/log.txt      the child's stdout and stderr
    <jobs>/<id>/result.json  the child's exit code and end time, written when it ends

A job runs under a small watcher process (``python -m kiln.gateway.jobs <dir> -- <command>``,
in its own session, so stopping the gateway does not cut a version switch in half): it runs the
command and then writes result.json, whichever gateway process started it and whether that one
still runs. A job with no result whose watcher is gone (killed) has failed. Starting a job
holds a lock on the folder (``flock``), so two processes cannot start two jobs for one model at
once. Nothing here blocks on the child: callers poll (the gateway from a worker thread).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

RUNNING, SUCCEEDED, FAILED = "running", "succeeded", "failed"
JOB_FILE, SPEC_FILE, LOG_FILE, RESULT_FILE = "job.json", "spec.yaml", "log.txt", "result.json"
LOCK_FILE = ".lock"
KEEP_FINISHED = 50  # finished jobs kept on disk; older ones are removed when a new one starts
LOG_LINES = 30  # lines of the child's log a job shows
_LOG_TAIL_BYTES = 16384
_ID = re.compile(r"^job_[0-9a-f]{20}$")
KILN = [sys.executable, "-m", "kiln.cli"]  # the CLI of this environment (the console script may not be on PATH)


@dataclass(frozen=True)
class Job:
    id: str
    model: str
    action: str  # reload | rollback
    status: str  # running | succeeded | failed
    started_at: float
    requested_by: str
    overrides: dict[str, Any] = field(default_factory=dict)
    finished_at: float | None = None
    exit_code: int | None = None
    note: str | None = None  # set when the outcome was not recorded (the watcher was killed)
    log: list[str] = field(default_factory=list)  # the last lines of the child's output

    def body(self, with_log: bool = True) -> dict[str, Any]:
        out = {"object": "admin.job", "id": self.id, "model": self.model, "action": self.action,
               "status": self.status, "requested_by": self.requested_by, "overrides": self.overrides,
               "started_at": round(self.started_at, 3),
               "finished_at": None if self.finished_at is None else round(self.finished_at, 3),
               "exit_code": self.exit_code}
        if self.note:
            out["note"] = self.note
        if with_log:
            out["log"] = self.log
        return out


class JobBusy(RuntimeError):
    """A job for this model is running already."""

    def __init__(self, job: Job):
        super().__init__(f"job {job.id} ({job.action} of {job.model!r}) is running")
        self.job = job


class JobRunner:
    """Starts jobs and reads them back from ``folder``. ``program`` is the command the action
    is appended to (default: this environment's ``kiln``; unit tests give a fake one)."""

    def __init__(self, folder: Path, program: list[str] | None = None, drop_env: tuple[str, ...] = (),
                 keep_finished: int = KEEP_FINISHED):
        self.folder = Path(folder)
        self.program = list(program or KILN)
        self.drop_env, self.keep_finished = drop_env, keep_finished
        self._watchers: dict[str, subprocess.Popen] = {}  # jobs this process started: reaped when polled

    # ------------------------------------------------------------------------- starting
    def start(self, model: str, action: str, spec_yaml: str, args: list[str], requested_by: str,
              overrides: dict[str, Any] | None = None) -> Job:
        """``<program> <action> <spec.yaml> <args...>`` for ``model``, or JobBusy when a job for
        it is running (in any process sharing the folder)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._locked():
            running = [j for j in self.jobs() if j.model == model and j.status == RUNNING]
            if running:
                raise JobBusy(running[0])
            job_id = f"job_{uuid.uuid4().hex[:20]}"
            folder = self.folder / job_id
            folder.mkdir()
            (folder / SPEC_FILE).write_text(spec_yaml)
            command = [*self.program, action, str((folder / SPEC_FILE).resolve()), *args]
            started = time.time()
            try:
                watcher = subprocess.Popen([sys.executable, "-m", "kiln.gateway.jobs", str(folder.resolve()), "--",
                                            *command], env=self._env(), stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           start_new_session=True)
            except OSError:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            self._watchers[job_id] = watcher
            _write_json(folder / JOB_FILE, {"id": job_id, "model": model, "action": action, "command": command,
                                            "started_at": started, "requested_by": requested_by,
                                            "overrides": overrides or {}, "pid": watcher.pid,
                                            "pid_started": process_start(watcher.pid)})
            self._prune()
        return self.get(job_id)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in self.drop_env}
        # the repository root must never be on the child's sys.path (README "Layout"); rich wraps
        # at 80 columns when it writes to a file: a refusal stays on one line of the log
        return {**env, "PYTHONSAFEPATH": "1", "COLUMNS": "200"}

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.folder / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _prune(self) -> None:
        finished = [j for j in self.jobs() if j.status != RUNNING]
        for job in finished[self.keep_finished:]:  # newest first: the oldest go
            shutil.rmtree(self.folder / job.id, ignore_errors=True)

    # ------------------------------------------------------------------------- reading
    def get(self, job_id: str) -> Job | None:
        """The job, or None for an id this folder does not hold (or one that is not an id)."""
        if not _ID.match(job_id):
            return None
        return self._read(self.folder / job_id, with_log=True)

    def jobs(self) -> list[Job]:
        """Every job in the folder, newest first (their logs left out)."""
        if not self.folder.is_dir():
            return []
        found = [self._read(p, with_log=False) for p in self.folder.iterdir() if _ID.match(p.name)]
        return sorted((j for j in found if j is not None), key=lambda j: j.started_at, reverse=True)

    def _read(self, folder: Path, with_log: bool) -> Job | None:
        try:
            asked = json.loads((folder / JOB_FILE).read_text())
        except (OSError, ValueError):  # not there, or being started (job.json is written last)
            return None
        result = _read_json(folder / RESULT_FILE)
        note = None
        if result is not None:
            status = SUCCEEDED if result["exit_code"] == 0 else FAILED
            self._reap(asked["id"])
        elif self._watching(asked["id"], int(asked["pid"]), asked.get("pid_started")):
            status = RUNNING
        else:
            result = _read_json(folder / RESULT_FILE)  # it may have ended between the two looks
            if result is not None:
                status = SUCCEEDED if result["exit_code"] == 0 else FAILED
            else:
                status, note = FAILED, "the job's process ended without recording an outcome (killed?)"
        result = result or {}
        return Job(id=asked["id"], model=asked["model"], action=asked["action"], status=status,
                   started_at=float(asked["started_at"]), requested_by=asked["requested_by"],
                   overrides=asked.get("overrides") or {}, finished_at=result.get("finished_at"),
                   exit_code=result.get("exit_code"), note=note,
                   log=log_tail(folder / LOG_FILE) if with_log else [])

    def _watching(self, job_id: str, pid: int, started: int | None) -> bool:
        """The job's watcher still runs (this process's own child: polled, which reaps it;
        another's: its pid, unless that pid now names a process started later)."""
        watcher = self._watchers.get(job_id)
        if watcher is not None:
            return watcher.poll() is None
        return pid_alive(pid) and (started is None or process_start(pid) in (None, started))

    def _reap(self, job_id: str) -> None:
        watcher = self._watchers.get(job_id)
        if watcher is not None and watcher.poll() is not None:
            self._watchers.pop(job_id, None)  # two threads may both get here


def log_tail(path: Path, lines: int = LOG_LINES) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _LOG_TAIL_BYTES))
            data = f.read()
    except OSError:
        return []
    text = data.decode("utf-8", "replace").splitlines()
    if size > _LOG_TAIL_BYTES:
        text = text[1:]  # the first line read is cut
    return text[-lines:]


def pid_alive(pid: int) -> bool:
    """A process with this pid runs (and is not a zombie waiting for another process to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def process_start(pid: int) -> int | None:
    """When the process started (clock ticks since boot, /proc), to tell a reused pid; None off Linux."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    """Whole or not at all: a reader never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def watch(folder: Path, command: list[str]) -> int:
    """The watcher: run ``command`` with its output in the job's log, then record how it ended.
    SIGTERM is passed on to the child (which then ends, and is recorded, as it does)."""
    with open(folder / LOG_FILE, "ab") as log:
        try:
            child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        except OSError as err:
            log.write(f"cannot start {command[0]}: {err}\n".encode())
            code = 127
        else:
            signal.signal(signal.SIGTERM, lambda *_: child.terminate())
            code = child.wait()
    _write_json(folder / RESULT_FILE, {"exit_code": code, "finished_at": time.time()})
    return code


if __name__ == "__main__":  # python -m kiln.gateway.jobs <job folder> -- <command ...>
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.exit("usage: python -m kiln.gateway.jobs <job folder> -- <command ...>")
    sys.exit(0 if watch(Path(sys.argv[1]), sys.argv[3:]) == 0 else 1)
