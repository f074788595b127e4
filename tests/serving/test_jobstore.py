"""SQLiteJobStore: records, pagination, results on disk, restart recovery, id checks."""
from __future__ import annotations

import sqlite3
import threading

import pytest

from serving.jobstore import (RESTART_REASON, JobNotFound, JobRecord, SQLiteJobStore,
                              is_valid_job_id, new_job_id)


def _job(status="queued", created_at=100, **kw) -> JobRecord:
    return JobRecord(id=new_job_id(), created_at=created_at, status=status, model="tiny-wan",
                     prompt="a cat", size="64x64", seconds="1.12", **kw)


def test_create_get_update(tmp_path):
    store = SQLiteJobStore(tmp_path)
    job = store.create(_job(params={"steps": 4}))
    assert store.get(job.id).status == "queued" and store.get(job.id).params == {"steps": 4}
    store.set_status(job.id, "in_progress", progress=0)
    store.set_progress(job.id, 40)
    assert (store.get(job.id).status, store.get(job.id).progress) == ("in_progress", 40)
    store.save_result(job.id, b"mp4 bytes")
    store.set_status(job.id, "completed", progress=100)
    done = store.get(job.id)
    assert done.status == "completed" and done.completed_at is not None and done.progress == 100
    assert store.result_path(job.id).read_bytes() == b"mp4 bytes"
    assert store.count_active() == 0
    # WAL mode, metadata in the database file under data_dir.
    mode = sqlite3.connect(tmp_path / "jobs.sqlite3").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_progress_only_moves_running_jobs(tmp_path):
    store = SQLiteJobStore(tmp_path)
    job = store.create(_job())
    store.set_progress(job.id, 50)  # still queued: ignored
    assert store.get(job.id).progress == 0


def test_delete_removes_record_and_file(tmp_path):
    store = SQLiteJobStore(tmp_path)
    job = store.create(_job())
    store.save_result(job.id, b"x")
    store.delete(job.id)
    with pytest.raises(JobNotFound):
        store.get(job.id)
    assert not store.result_path(job.id).exists()
    store.set_status(job.id, "failed", error_code="x", error_message="y")  # deleted stays deleted
    with pytest.raises(JobNotFound):
        store.get(job.id)


def test_list_newest_first_with_cursor(tmp_path):
    store = SQLiteJobStore(tmp_path)
    ids = [store.create(_job(created_at=100)).id for _ in range(5)]  # same second: seq orders
    page, more = store.list(limit=2)
    assert [j.id for j in page] == ids[::-1][:2] and more
    page2, more2 = store.list(limit=2, after=page[-1].id)
    assert [j.id for j in page2] == ids[::-1][2:4] and more2
    page3, more3 = store.list(limit=2, after=page2[-1].id)
    assert [j.id for j in page3] == [ids[0]] and not more3
    asc, _ = store.list(limit=5, order="asc")
    assert [j.id for j in asc] == ids
    with pytest.raises(JobNotFound):
        store.list(limit=2, after=new_job_id())


def test_restart_fails_interrupted_jobs_keeps_results(tmp_path):
    store = SQLiteJobStore(tmp_path)
    done = store.create(_job())
    store.save_result(done.id, b"video")
    store.set_status(done.id, "completed", progress=100)
    running = store.create(_job())
    store.set_status(running.id, "in_progress", progress=0)
    queued = store.create(_job())
    store.close()

    reopened = SQLiteJobStore(tmp_path)
    assert sorted(reopened.fail_interrupted()) == sorted([running.id, queued.id])
    for job_id in (running.id, queued.id):
        job = reopened.get(job_id)
        assert job.status == "failed" and job.error_message == RESTART_REASON
        assert job.completed_at is not None
    assert reopened.get(done.id).status == "completed"
    assert reopened.result_path(done.id).read_bytes() == b"video"


@pytest.mark.parametrize("bad", ["../../etc/passwd", "video_../x", "video_" + "g" * 32,
                                 "VIDEO_" + "a" * 32, "video_" + "a" * 31, "", "video_" + "a" * 32 + "/"])
def test_malformed_ids_never_reach_the_file_system(tmp_path, bad):
    store = SQLiteJobStore(tmp_path)
    assert not is_valid_job_id(bad)
    with pytest.raises(JobNotFound):
        store.get(bad)
    with pytest.raises(JobNotFound):
        store.result_path(bad)


def test_concurrent_writers(tmp_path):
    store = SQLiteJobStore(tmp_path)
    errors = []

    def work():
        try:
            for _ in range(20):
                job = store.create(_job())
                store.set_status(job.id, "in_progress", progress=0)
                store.set_progress(job.id, 10)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and store.count_active() == 80
