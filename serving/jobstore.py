"""Durable job records: status, progress and results of video jobs.

`JobStore` is the interface the ingress uses; `SQLiteJobStore` is the embedded default: metadata
in `DATA_DIR/jobs.sqlite3` (WAL mode), results as files `DATA_DIR/videos/<id>.mp4`.

Ids are checked against `JOB_ID_PATTERN` before anything touches the file system, so no string
from a request ever becomes a path.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

JobStatus = Literal["queued", "in_progress", "completed", "failed"]
JOB_ID_PATTERN = re.compile(r"^video_[0-9a-f]{32}$")
RESTART_REASON = "service restarted while the job was running"


def new_job_id() -> str:
    """A fresh job id, `video_` + 32 hex digits."""
    return "video_" + secrets.token_hex(16)


def is_valid_job_id(job_id: str) -> bool:
    return isinstance(job_id, str) and JOB_ID_PATTERN.fullmatch(job_id) is not None


class JobNotFound(KeyError):
    """No job with this id (or the id is malformed)."""


@dataclass(frozen=True)
class JobRecord:
    """One job as stored. `params` holds the resolved request fields shown back to clients."""

    id: str
    created_at: int
    status: JobStatus
    model: str
    prompt: str
    size: str
    seconds: str
    progress: int = 0
    completed_at: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    """Insertion order, the tie-breaker for equal `created_at` (newest first = highest seq)."""


class JobStore(Protocol):
    """What the ingress needs from a job store. Implementations must be safe to call from
    several threads of one process."""

    def create(self, record: JobRecord) -> JobRecord: ...
    def get(self, job_id: str) -> JobRecord: ...
    def list(self, *, limit: int, after: str | None = None, order: str = "desc") -> tuple[list[JobRecord], bool]: ...
    def set_status(self, job_id: str, status: JobStatus, *, progress: int | None = None,
                   error_code: str | None = None, error_message: str | None = None) -> None: ...
    def set_progress(self, job_id: str, progress: int) -> None: ...
    def save_result(self, job_id: str, data: bytes) -> None: ...
    def result_path(self, job_id: str) -> Path: ...
    def delete(self, job_id: str) -> None: ...
    def fail_interrupted(self, reason: str = RESTART_REASON) -> list[str]: ...
    def count_active(self) -> int: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created_at INTEGER NOT NULL,
    completed_at INTEGER,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    size TEXT NOT NULL,
    seconds TEXT NOT NULL,
    error_code TEXT,
    error_message TEXT,
    params TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
"""

_COLUMNS = ("seq, id, created_at, completed_at, status, progress, model, prompt, size, seconds, "
            "error_code, error_message, params")


class SQLiteJobStore:
    """Job metadata in SQLite (WAL), results as `videos/<id>.mp4` files under `data_dir`."""

    def __init__(self, data_dir: str | os.PathLike) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.videos_dir = self.data_dir / "videos"
        self.videos_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.data_dir / "jobs.sqlite3", check_same_thread=False,
                                   isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    # -- reads -------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord:
        if not is_valid_job_id(job_id):
            raise JobNotFound(job_id)
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return _to_record(row)

    def list(self, *, limit: int, after: str | None = None, order: str = "desc") -> tuple[list[JobRecord], bool]:
        """Up to `limit` jobs, newest first (`order="desc"`) or oldest first, starting after the
        job `after` (a cursor, as in OpenAI's list endpoints). Returns (jobs, has_more)."""
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', got {order!r}")
        cmp, direction = ("<", "DESC") if order == "desc" else (">", "ASC")
        with self._lock:
            if after is None:
                rows = self._db.execute(
                    f"SELECT {_COLUMNS} FROM jobs ORDER BY seq {direction} LIMIT ?", (limit + 1,)
                ).fetchall()
            else:
                cursor = self._db.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
                if cursor is None:
                    raise JobNotFound(after)
                rows = self._db.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE seq {cmp} ? ORDER BY seq {direction} LIMIT ?",
                    (cursor[0], limit + 1),
                ).fetchall()
        return [_to_record(r) for r in rows[:limit]], len(rows) > limit

    def count_active(self) -> int:
        with self._lock:
            (n,) = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'in_progress')").fetchone()
        return n

    def result_path(self, job_id: str) -> Path:
        """Where the job's MP4 lives (only for well-formed ids)."""
        if not is_valid_job_id(job_id):
            raise JobNotFound(job_id)
        return self.videos_dir / f"{job_id}.mp4"

    # -- writes ------------------------------------------------------------------------------
    def create(self, record: JobRecord) -> JobRecord:
        if not is_valid_job_id(record.id):
            raise ValueError(f"malformed job id {record.id!r}")
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO jobs (id, created_at, completed_at, status, progress, model, prompt, "
                "size, seconds, error_code, error_message, params) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (record.id, record.created_at, record.completed_at, record.status, record.progress,
                 record.model, record.prompt, record.size, record.seconds, record.error_code,
                 record.error_message, json.dumps(record.params)),
            )
        return replace(record, seq=cur.lastrowid)

    def set_status(self, job_id: str, status: JobStatus, *, progress: int | None = None,
                   error_code: str | None = None, error_message: str | None = None) -> None:
        """Moves a job to `status`. Finished jobs (completed/failed) get `completed_at`.
        A job that was deleted meanwhile is left deleted (no-op)."""
        finished = status in ("completed", "failed")
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = ?, progress = COALESCE(?, progress), "
                "completed_at = CASE WHEN ? THEN ? ELSE completed_at END, "
                "error_code = ?, error_message = ? WHERE id = ?",
                (status, progress, finished, int(time.time()), error_code, error_message, job_id),
            )

    def set_progress(self, job_id: str, progress: int) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET progress = ? WHERE id = ? AND status = 'in_progress'",
                             (int(progress), job_id))

    def save_result(self, job_id: str, data: bytes) -> None:
        """Writes the MP4 atomically (temp file + rename), so a download never sees half a file."""
        path = self.result_path(job_id)
        tmp = path.with_suffix(".mp4.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def delete(self, job_id: str) -> None:
        path = self.result_path(job_id)
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        path.unlink(missing_ok=True)

    def fail_interrupted(self, reason: str = RESTART_REASON) -> list[str]:
        """Marks every queued / in-progress job failed (called at start-up: nothing is running
        yet, so such jobs were cut off by a restart). Returns their ids."""
        with self._lock:
            ids = [r[0] for r in self._db.execute(
                "SELECT id FROM jobs WHERE status IN ('queued', 'in_progress')").fetchall()]
            self._db.execute(
                "UPDATE jobs SET status = 'failed', completed_at = ?, error_code = 'interrupted', "
                "error_message = ? WHERE status IN ('queued', 'in_progress')",
                (int(time.time()), reason),
            )
        return ids

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _to_record(row: tuple) -> JobRecord:
    (seq, id_, created_at, completed_at, status, progress, model, prompt, size, seconds,
     error_code, error_message, params) = row
    return JobRecord(id=id_, created_at=created_at, completed_at=completed_at, status=status,
                     progress=progress, model=model, prompt=prompt, size=size, seconds=seconds,
                     error_code=error_code, error_message=error_message,
                     params=json.loads(params), seq=seq)
