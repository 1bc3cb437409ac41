"""The admin job runner with a fake child command, no server: a job runs, then succeeds or
fails with its exit code and the end of its log; the outcome is on disk, so another gateway
process sharing the folder (here: another runner) sees it, and cannot start a second job for
the same model; a job whose process was killed reads as failed; old jobs are pruned."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from kiln.gateway.jobs import (
    FAILED,
    JOB_FILE,
    RUNNING,
    SUCCEEDED,
    Job,
    JobBusy,
    JobRunner,
    log_tail,
    process_start,
)


def wait_done(runner: JobRunner, job_id: str, timeout: float = 30.0) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = runner.get(job_id)
        if job.status != RUNNING:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still running after {timeout:.0f}s: {runner.get(job_id)}")


def wait_logged(runner: JobRunner, job_id: str, text: str, timeout: float = 30.0) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = runner.get(job_id)
        if any(text in line for line in job.log):
            return job
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in job {job_id}'s log: {runner.get(job_id).log}")


def test_a_job_runs_then_succeeds_with_its_log_and_another_process_sees_it(tmp_path, fake_kiln):
    release = tmp_path / "release"
    runner = JobRunner(tmp_path / "jobs", program=fake_kiln(release))
    job = runner.start("enc", "reload", "name: enc\n", ["--server-dir", "/srv"], "ops", {"serve_precision": "fp16"})
    assert job.status == RUNNING and job.exit_code is None and job.finished_at is None
    assert job.id.startswith("job_") and job.model == "enc" and job.requested_by == "ops"
    running = wait_logged(runner, job.id, "spec: name: enc")
    assert running.status == RUNNING
    assert running.log[0].startswith("fake kiln reload ") and running.log[0].endswith("spec.yaml --server-dir /srv")
    other = JobRunner(tmp_path / "jobs")  # another gateway worker on the same folder
    assert other.get(job.id).status == RUNNING
    with pytest.raises(JobBusy) as busy:  # neither may start a second job for the model
        other.start("enc", "rollback", "name: enc\n", [], "ops")
    assert busy.value.job.id == job.id
    release.touch()
    done = wait_done(runner, job.id)
    assert done.status == SUCCEEDED and done.exit_code == 0 and done.finished_at >= done.started_at
    assert done.log[-1] == "fake kiln exits 0"
    seen = wait_done(other, job.id)
    assert (seen.status, seen.exit_code, seen.finished_at) == (SUCCEEDED, 0, done.finished_at)
    assert [j.id for j in other.jobs()] == [job.id] and other.jobs()[0].log == []  # listed without logs
    assert done.body()["overrides"] == {"serve_precision": "fp16"} and "log" not in done.body(with_log=False)
    again = other.start("enc", "rollback", "name: enc\n", [], "ops")  # the model is free again
    assert [j.id for j in runner.jobs()] == [again.id, job.id]  # newest first
    wait_done(runner, again.id)


def test_a_failing_child_is_a_failed_job_with_its_exit_code(tmp_path, fake_kiln):
    release = tmp_path / "release"
    release.touch()
    runner = JobRunner(tmp_path / "jobs", program=fake_kiln(release, code=3))
    done = wait_done(runner, runner.start("enc", "reload", "name: enc\n", [], "ops").id)
    assert done.status == FAILED and done.exit_code == 3 and done.log[-1] == "fake kiln exits 3"
    missing = JobRunner(tmp_path / "jobs2", program=[str(tmp_path / "no-such-kiln")])
    gone = wait_done(missing, missing.start("enc", "reload", "", [], "ops").id)
    assert gone.status == FAILED and gone.exit_code == 127 and "cannot start" in gone.log[0]


def test_a_job_whose_process_was_killed_reads_as_failed(tmp_path, fake_kiln):
    runner = JobRunner(tmp_path / "jobs", program=fake_kiln(tmp_path / "never"))
    job = runner.start("enc", "reload", "name: enc\n", [], "ops")
    wait_logged(runner, job.id, "fake kiln reload")
    os.killpg(runner._watchers[job.id].pid, signal.SIGKILL)  # the watcher and its child: no outcome recorded
    done = wait_done(runner, job.id)
    assert done.status == FAILED and done.exit_code is None and "without recording an outcome" in done.note
    assert JobRunner(tmp_path / "jobs").get(job.id).status == FAILED  # also for a process that did not start it


def test_a_job_left_by_an_earlier_gateway_whose_pid_was_reused_reads_as_failed(tmp_path):
    """The jobs folder outlives the gateway (and the machine's pids): a pid that now names a
    process started later is not the job's watcher."""
    me, started = os.getpid(), process_start(os.getpid())
    for job_id, pid_started in (("job_" + "a" * 20, started), ("job_" + "b" * 20, started - 1)):
        (tmp_path / job_id).mkdir()
        (tmp_path / job_id / JOB_FILE).write_text(json.dumps({
            "id": job_id, "model": "enc", "action": "reload", "command": [], "started_at": time.time(),
            "requested_by": "ops", "overrides": {}, "pid": me, "pid_started": pid_started}))
    runner = JobRunner(tmp_path)
    assert runner.get("job_" + "a" * 20).status == RUNNING  # this pid, started then: still the watcher
    stale = runner.get("job_" + "b" * 20)
    assert stale.status == FAILED and "without recording an outcome" in stale.note


def test_sigterm_to_a_job_is_passed_to_its_child_and_recorded(tmp_path, fake_kiln):
    runner = JobRunner(tmp_path / "jobs", program=fake_kiln(tmp_path / "never"))
    job = runner.start("enc", "reload", "name: enc\n", [], "ops")
    wait_logged(runner, job.id, "fake kiln reload")
    os.kill(runner._watchers[job.id].pid, signal.SIGTERM)
    done = wait_done(runner, job.id)
    assert done.status == FAILED and done.exit_code == -signal.SIGTERM and done.note is None


def test_only_job_ids_are_looked_up_and_old_jobs_are_pruned(tmp_path, fake_kiln):
    release = tmp_path / "release"
    release.touch()
    runner = JobRunner(tmp_path / "jobs", program=fake_kiln(release), keep_finished=2)
    assert runner.jobs() == [] and runner.get("job_" + "0" * 20) is None
    ids = []
    for _ in range(4):
        ids.append(runner.start("enc", "reload", "name: enc\n", [], "ops").id)
        wait_done(runner, ids[-1])
    assert [j.id for j in runner.jobs()] == ids[::-1][:3]  # pruned at each start: two finished + the newest
    (tmp_path / "secret").mkdir()
    for bad in ("../secret", "job_../../x", "", ".lock"):
        assert runner.get(bad) is None


def test_the_log_tail_is_the_last_whole_lines(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text("".join(f"line {i} " + "x" * 100 + "\n" for i in range(1000)))
    tail = log_tail(path, lines=5)
    assert len(tail) == 5 and tail[-1].startswith("line 999 ") and all(t.endswith("x" * 100) for t in tail)
    assert log_tail(tmp_path / "none") == []
