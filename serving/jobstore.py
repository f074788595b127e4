"""Durable job records: status, progress, owner and result of generation jobs (videos, images).

`JobStore` is the interface the ingress uses; `SQLiteJobStore` is the embedded default: metadata
in `DATA_DIR/jobs.sqlite3` (WAL mode), results as files `DATA_DIR/<kind>s/<id><ext>` (a video job's
MP4 in `videos/`, an image job's PNG in `images/`).

Results are typed artifacts: the store records each result's mime type and file, so image and
video jobs share one store (`ARTIFACT_TYPES` lists the accepted types and their extensions).

Ids are `<kind>_<32 hex digits>` (`video_...`, `image_...`) and are checked against
`JOB_ID_PATTERN` before anything touches the file system, so no string from a request ever
becomes a path.

Several ingress replicas may share one store (same node, same data dir): each is a *runner*
that heartbeats (`heartbeat`) while it lives, and every job records its runner. A job left
queued or running by a runner whose heartbeat went stale (its replica died) is failed by
`fail_orphaned`, which every replica calls at start and periodically.

Schema versions (`PRAGMA user_version`): 0 = the first store (video only, no owner, no runner);
2 = this one. An old database is migrated in place when opened; its finished videos stay
readable where they are (`videos/<id>.mp4`).
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
JobKind = Literal["video", "image"]
JOB_KINDS: tuple[str, ...] = ("video", "image")
JOB_ID_PATTERN = re.compile(r"^(video|image)_[0-9a-f]{32}$")
RESTART_REASON = "service restarted while the job was running"
SCHEMA_VERSION = 2

ARTIFACT_TYPES: dict[str, str] = {
    "video/mp4": ".mp4",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
}
"""Mime type of a result -> the extension of its file."""


def new_job_id(kind: JobKind = "video") -> str:
    """A fresh job id, `<kind>_` + 32 hex digits."""
    if kind not in JOB_KINDS:
        raise ValueError(f"kind must be one of {', '.join(JOB_KINDS)}, got {kind!r}")
    return f"{kind}_{secrets.token_hex(16)}"


def is_valid_job_id(job_id: str) -> bool:
    return isinstance(job_id, str) and JOB_ID_PATTERN.fullmatch(job_id) is not None


def job_kind(job_id: str) -> str:
    """"video" or "image", from a well-formed id."""
    return job_id.split("_", 1)[0]


class JobNotFound(KeyError):
    """No job with this id (or the id is malformed, or it belongs to another owner)."""


@dataclass(frozen=True)
class Artifact:
    """A job's stored result: its mime type and its file, relative to the data dir."""

    mime: str
    file: str

    @property
    def ext(self) -> str:
        return ARTIFACT_TYPES[self.mime]


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
    owner: str | None = None
    """Who made the job (an API key's owner id); None when the service runs without keys."""
    runner: str | None = None
    """The ingress replica that runs the job (see `SQLiteJobStore.heartbeat`)."""
    result: Artifact | None = None
    """The stored result once completed."""
    seq: int = 0
    """Insertion order, the tie-breaker for equal `created_at` (newest first = highest seq)."""

    @property
    def kind(self) -> str:
        return job_kind(self.id)


class JobStore(Protocol):
    """What the ingress needs from a job store. Implementations must be safe to call from
    several threads of one process. `owner=None` in a read means "any owner"."""

    def create(self, record: JobRecord) -> JobRecord: ...
    def get(self, job_id: str, *, owner: str | None = None) -> JobRecord: ...
    def list(self, *, limit: int, after: str | None = None, order: str = "desc",
             owner: str | None = None) -> tuple[list[JobRecord], bool]: ...
    def set_status(self, job_id: str, status: JobStatus, *, progress: int | None = None,
                   error_code: str | None = None, error_message: str | None = None) -> None: ...
    def set_progress(self, job_id: str, progress: int) -> None: ...
    def save_result(self, job_id: str, data: bytes, mime: str = "video/mp4") -> Artifact | None: ...
    def result_path(self, job_id: str) -> Path | None: ...
    def delete(self, job_id: str) -> None: ...
    def existing(self, job_ids: list[str]) -> set[str]: ...
    def heartbeat(self, runner: str) -> None: ...
    def fail_orphaned(self, lease_s: float, reason: str = RESTART_REASON) -> list[str]: ...
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
    params TEXT NOT NULL DEFAULT '{}',
    owner TEXT,
    runner TEXT,
    result_mime TEXT,
    result_file TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, seq);
CREATE TABLE IF NOT EXISTS runners (
    id TEXT PRIMARY KEY,
    heartbeat_at REAL NOT NULL
);
"""

_ADDED_IN_2 = ("owner", "runner", "result_mime", "result_file")
"""Columns version 2 added to the jobs table (all TEXT, NULL in migrated rows)."""
_RESULTS_OF_0 = ("UPDATE jobs SET result_mime = 'video/mp4', result_file = 'videos/' || id || '.mp4' "
                 "WHERE status = 'completed'")
"""Version 0 kept every finished job's result at videos/<id>.mp4."""

_COLUMNS = ("seq, id, created_at, completed_at, status, progress, model, prompt, size, seconds, "
            "error_code, error_message, params, owner, runner, result_mime, result_file")


class SQLiteJobStore:
    """Job metadata in SQLite (WAL), results as files under `data_dir`; see the module doc."""

    def __init__(self, data_dir: str | os.PathLike) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for kind in JOB_KINDS:
            (self.data_dir / f"{kind}s").mkdir(exist_ok=True)
        self.videos_dir = self.data_dir / "videos"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.data_dir / "jobs.sqlite3", check_same_thread=False,
                                   isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._migrate()

    def _migrate(self) -> None:
        """Create the schema, or bring an older database to `SCHEMA_VERSION` (one transaction)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # one migrating process at a time
            try:
                (version,) = self._db.execute("PRAGMA user_version").fetchone()
                old = self._db.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone()
                if old is not None and version < 2:
                    columns = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
                    for column in _ADDED_IN_2:
                        if column not in columns:
                            self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} TEXT")
                    self._db.execute(_RESULTS_OF_0)
                elif version > SCHEMA_VERSION:
                    raise RuntimeError(f"{self.data_dir / 'jobs.sqlite3'} has schema version {version}; "
                                       f"this code knows up to {SCHEMA_VERSION} (a newer release wrote it)")
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- reads -------------------------------------------------------------------------------
    def get(self, job_id: str, *, owner: str | None = None) -> JobRecord:
        """The job; `JobNotFound` for unknown or malformed ids and, when `owner` is given, for
        another owner's job (no one learns that another's job exists)."""
        if not is_valid_job_id(job_id):
            raise JobNotFound(job_id)
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        record = _to_record(row)
        if owner is not None and record.owner != owner:
            raise JobNotFound(job_id)
        return record

    def list(self, *, limit: int, after: str | None = None, order: str = "desc",
             owner: str | None = None) -> tuple[list[JobRecord], bool]:
        """Up to `limit` jobs, newest first (`order="desc"`) or oldest first, starting after the
        job `after` (a cursor, as in OpenAI's list endpoints), only `owner`'s when given.
        Returns (jobs, has_more)."""
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', got {order!r}")
        cmp, direction = ("<", "DESC") if order == "desc" else (">", "ASC")
        where, params = ([], []) if owner is None else (["owner = ?"], [owner])
        with self._lock:
            if after is not None:
                cursor = None
                if is_valid_job_id(after):
                    cursor = self._db.execute("SELECT seq, owner FROM jobs WHERE id = ?", (after,)).fetchone()
                if cursor is None or (owner is not None and cursor[1] != owner):
                    raise JobNotFound(after)
                where.append(f"seq {cmp} ?")
                params.append(cursor[0])
            clause = f"WHERE {' AND '.join(where)} " if where else ""
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs {clause}ORDER BY seq {direction} LIMIT ?",
                (*params, limit + 1)).fetchall()
        return [_to_record(r) for r in rows[:limit]], len(rows) > limit

    def count_active(self) -> int:
        with self._lock:
            (n,) = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'in_progress')").fetchone()
        return n

    def existing(self, job_ids: list[str]) -> set[str]:
        """Which of these jobs still exist (a runner's jobs deleted elsewhere are cancelled)."""
        if not job_ids:
            return set()
        with self._lock:
            rows = self._db.execute(
                f"SELECT id FROM jobs WHERE id IN ({','.join('?' * len(job_ids))})", job_ids).fetchall()
        return {r[0] for r in rows}

    def result_path(self, job_id: str) -> Path | None:
        """The file of the job's result, None while it has none (unknown ids: `JobNotFound`)."""
        result = self.get(job_id).result
        return None if result is None else self.data_dir / result.file

    # -- writes ------------------------------------------------------------------------------
    def create(self, record: JobRecord) -> JobRecord:
        if not is_valid_job_id(record.id):
            raise ValueError(f"malformed job id {record.id!r}")
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO jobs (id, created_at, completed_at, status, progress, model, prompt, "
                "size, seconds, error_code, error_message, params, owner, runner) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (record.id, record.created_at, record.completed_at, record.status, record.progress,
                 record.model, record.prompt, record.size, record.seconds, record.error_code,
                 record.error_message, json.dumps(record.params), record.owner, record.runner),
            )
        return replace(record, seq=cur.lastrowid)

    def set_status(self, job_id: str, status: JobStatus, *, progress: int | None = None,
                   error_code: str | None = None, error_message: str | None = None) -> None:
        """Moves a job to `status`. Finished jobs (completed/failed) get `completed_at`.
        A job that was deleted meanwhile is left deleted (no-op); so is a finished one (a job
        failed as orphaned stays failed even if its runner comes back)."""
        finished = status in ("completed", "failed")
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = ?, progress = COALESCE(?, progress), "
                "completed_at = CASE WHEN ? THEN ? ELSE completed_at END, "
                "error_code = ?, error_message = ? "
                "WHERE id = ? AND status IN ('queued', 'in_progress')",
                (status, progress, finished, int(time.time()), error_code, error_message, job_id),
            )

    def set_progress(self, job_id: str, progress: int) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET progress = ? WHERE id = ? AND status = 'in_progress'",
                             (int(progress), job_id))

    def save_result(self, job_id: str, data: bytes, mime: str = "video/mp4") -> Artifact | None:
        """Writes the result file atomically (temp file + rename, so a download never sees half
        a file) and records it. A job deleted meanwhile keeps no file (returns None)."""
        if mime not in ARTIFACT_TYPES:
            raise ValueError(f"mime must be one of {', '.join(ARTIFACT_TYPES)}, got {mime!r}")
        if not is_valid_job_id(job_id):
            raise JobNotFound(job_id)
        artifact = Artifact(mime=mime, file=f"{job_kind(job_id)}s/{job_id}{ARTIFACT_TYPES[mime]}")
        path = self.data_dir / artifact.file
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        with self._lock:
            cur = self._db.execute("UPDATE jobs SET result_mime = ?, result_file = ? WHERE id = ?",
                                   (artifact.mime, artifact.file, job_id))
        if cur.rowcount == 0:  # deleted while it ran (maybe by another replica)
            path.unlink(missing_ok=True)
            return None
        return artifact

    def delete(self, job_id: str) -> None:
        if not is_valid_job_id(job_id):
            raise JobNotFound(job_id)
        with self._lock:
            row = self._db.execute("SELECT result_file FROM jobs WHERE id = ?", (job_id,)).fetchone()
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        if row is not None and row[0]:
            (self.data_dir / row[0]).unlink(missing_ok=True)

    def heartbeat(self, runner: str) -> None:
        """`runner` (an ingress replica) is alive now; its jobs are not orphans."""
        with self._lock:
            self._db.execute("INSERT INTO runners (id, heartbeat_at) VALUES (?, ?) "
                             "ON CONFLICT(id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                             (runner, time.time()))

    def retire(self, runner: str) -> None:
        """`runner` stops (clean shutdown): forget it."""
        with self._lock:
            self._db.execute("DELETE FROM runners WHERE id = ?", (runner,))

    def fail_orphaned(self, lease_s: float, reason: str = RESTART_REASON) -> list[str]:
        """Marks failed (code `interrupted`) every queued / in-progress job whose runner has not
        heartbeat for `lease_s` seconds, is unknown, or is unset (a store written before runners
        existed). Returns their ids."""
        stale = ("runner IS NULL OR runner NOT IN "
                 "(SELECT id FROM runners WHERE heartbeat_at >= ?)")
        now = time.time()
        with self._lock:
            ids = [r[0] for r in self._db.execute(
                f"SELECT id FROM jobs WHERE status IN ('queued', 'in_progress') AND ({stale})",
                (now - lease_s,)).fetchall()]
            if ids:
                self._db.execute(
                    "UPDATE jobs SET status = 'failed', completed_at = ?, error_code = 'interrupted', "
                    f"error_message = ? WHERE status IN ('queued', 'in_progress') AND ({stale})",
                    (int(now), reason, now - lease_s))
            self._db.execute("DELETE FROM runners WHERE heartbeat_at < ?", (now - 10 * lease_s,))
        return ids

    def fail_interrupted(self, reason: str = RESTART_REASON) -> list[str]:
        """Marks every queued / in-progress job failed (a store used by one process that has
        just started: nothing of it is running yet). Returns their ids."""
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
     error_code, error_message, params, owner, runner, result_mime, result_file) = row
    result = Artifact(mime=result_mime, file=result_file) if result_mime and result_file else None
    return JobRecord(id=id_, created_at=created_at, completed_at=completed_at, status=status,
                     progress=progress, model=model, prompt=prompt, size=size, seconds=seconds,
                     error_code=error_code, error_message=error_message,
                     params=json.loads(params), owner=owner, runner=runner, result=result, seq=seq)
