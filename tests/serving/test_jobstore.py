"""SQLiteJobStore: records, pagination, typed results on disk, owners, restart recovery and
runner leases, the migration of a store written by the first version, id checks."""
from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest

from serving.jobstore import (RESTART_REASON, SCHEMA_VERSION, Artifact, JobNotFound, JobRecord,
                              SQLiteJobStore, is_valid_job_id, new_job_id)


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
    path = store.result_path(job.id)
    assert path == tmp_path / "videos" / f"{job.id}.mp4" and path.is_file()
    store.delete(job.id)
    with pytest.raises(JobNotFound):
        store.get(job.id)
    assert not path.exists()
    assert store.save_result(job.id, b"late") is None  # a job deleted while it ran keeps no file
    assert not path.exists()
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


@pytest.mark.parametrize("bad", ["../../etc/passwd", "video_../x", "video_" + "g" * 32, "audio_" + "a" * 32,
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


def test_typed_artifacts_for_videos_and_images(tmp_path):
    store = SQLiteJobStore(tmp_path)
    video = store.create(_job())
    image = store.create(JobRecord(id=new_job_id("image"), created_at=1, status="queued",
                                   model="qwen-image", prompt="a cat", size="64x64", seconds="0"))
    assert image.id.startswith("image_") and image.kind == "image" and video.kind == "video"
    assert store.save_result(video.id, b"mp4") == Artifact("video/mp4", f"videos/{video.id}.mp4")
    assert store.save_result(image.id, b"png", mime="image/png") == Artifact("image/png", f"images/{image.id}.png")
    assert store.get(image.id).result.mime == "image/png" and store.get(image.id).result.ext == ".png"
    assert store.result_path(image.id).read_bytes() == b"png"
    assert store.get(video.id).result.mime == "video/mp4"
    assert store.result_path(store.create(_job()).id) is None  # no result yet
    with pytest.raises(ValueError, match="mime must be one of"):
        store.save_result(video.id, b"x", mime="text/html")
    with pytest.raises(ValueError, match="kind must be one of"):
        new_job_id("audio")


def test_owners_see_only_their_jobs(tmp_path):
    store = SQLiteJobStore(tmp_path)
    a = [store.create(_job(owner="key_a")).id for _ in range(3)]
    b = store.create(_job(owner="key_b")).id
    assert store.get(a[0], owner="key_a").owner == "key_a"
    with pytest.raises(JobNotFound):
        store.get(b, owner="key_a")
    page, more = store.list(limit=10, owner="key_a")
    assert [j.id for j in page] == a[::-1] and not more
    with pytest.raises(JobNotFound):  # another owner's id is no cursor either
        store.list(limit=10, owner="key_a", after=b)
    assert {j.id for j in store.list(limit=10)[0]} == set(a) | {b}  # owner=None: everyone's


def test_orphaned_jobs_of_a_dead_runner_fail_live_runners_keep_theirs(tmp_path):
    store = SQLiteJobStore(tmp_path)
    store.heartbeat("live")
    store.heartbeat("dead")
    mine = store.create(_job(runner="live"))
    theirs = store.create(_job(runner="dead"))
    store.set_status(theirs.id, "in_progress", progress=0)
    legacy = store.create(_job())  # no runner: written before runners existed
    done = store.create(_job(runner="dead"))
    store.set_status(done.id, "completed", progress=100)
    assert store.fail_orphaned(lease_s=5) == [legacy.id]
    # "dead" stops heartbeating; "live" goes on.
    with store._lock:
        store._db.execute("UPDATE runners SET heartbeat_at = ? WHERE id = 'dead'", (time.time() - 60,))
    store.heartbeat("live")
    assert store.fail_orphaned(lease_s=5) == [theirs.id]
    failed = store.get(theirs.id)
    assert (failed.status, failed.error_code, failed.error_message) == ("failed", "interrupted", RESTART_REASON)
    assert store.get(mine.id).status == "queued" and store.get(done.id).status == "completed"
    # A runner that comes back late cannot move a failed job again.
    store.set_status(theirs.id, "completed", progress=100)
    assert store.get(theirs.id).status == "failed"
    assert store.existing([mine.id, theirs.id, new_job_id()]) == {mine.id, theirs.id}


_VERSION_0_SCHEMA = """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, created_at INTEGER NOT NULL,
    completed_at INTEGER, status TEXT NOT NULL, progress INTEGER NOT NULL DEFAULT 0,
    model TEXT NOT NULL, prompt TEXT NOT NULL, size TEXT NOT NULL, seconds TEXT NOT NULL,
    error_code TEXT, error_message TEXT, params TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX jobs_status ON jobs(status);
"""


def test_a_store_written_by_the_first_version_is_migrated(tmp_path):
    """The first store (schema version 0): video jobs only, results at videos/<id>.mp4."""
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.executescript(_VERSION_0_SCHEMA)
    done, running = new_job_id(), new_job_id()
    for job_id, status in ((done, "completed"), (running, "in_progress")):
        db.execute("INSERT INTO jobs (id, created_at, completed_at, status, progress, model, prompt, "
                   "size, seconds, params) VALUES (?, 5, 6, ?, 100, 'tiny-wan', 'old', '64x64', '1', ?)",
                   (job_id, status, json.dumps({"num_frames": 9})))
    db.commit()
    db.close()
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / f"{done}.mp4").write_bytes(b"old mp4")

    store = SQLiteJobStore(tmp_path)
    assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    old = store.get(done)
    assert old.status == "completed" and old.params == {"num_frames": 9} and old.owner is None
    assert old.result == Artifact("video/mp4", f"videos/{done}.mp4")
    assert store.result_path(done).read_bytes() == b"old mp4"
    assert store.fail_orphaned(lease_s=5) == [running]  # no runner recorded: interrupted
    new = store.create(_job(owner="key_a", runner="r1"))
    assert [j.id for j in store.list(limit=5)[0]] == [new.id, running, done]
    store.close()
    # Opening it again changes nothing.
    again = SQLiteJobStore(tmp_path)
    assert again.get(done).result.file == f"videos/{done}.mp4" and again.get(new.id).owner == "key_a"
