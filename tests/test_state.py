"""The job store's outbox on disk: large results as files beside the database, removed with
their rows, orphans cleaned at open, damaged entries dropped and counted, old databases
migrated."""

from __future__ import annotations

import sqlite3
import time

from agent.state.jobs import OUTBOX_INLINE_MAX, JobStore

BIG = bytes(range(256)) * (OUTBOX_INLINE_MAX // 128)  # twice the inline limit


def _put(store: JobStore, job_id: str, payload: bytes) -> int:
    store.remember(job_id, 1, time.time() + 60, accepted=True, now=time.time())
    return store.finish_with_result(job_id, 1, "t", payload, time.time())


def test_large_results_live_in_files_and_leave_with_their_row(tmp_path):
    store = JobStore(tmp_path / "state.db")
    big, small = _put(store, "big", BIG), _put(store, "small", b"tiny")
    files = list((tmp_path / "outbox").iterdir())
    assert len(files) == 1 and files[0].stat().st_size == len(BIG)
    assert [(s, p) for s, _, p, _, _ in store.outbox_batch()] == [(big, BIG), (small, b"tiny")]
    store.outbox_remove(big)
    assert list((tmp_path / "outbox").iterdir()) == []
    assert store.outbox_size() == 1


def test_outbox_files_survive_a_restart_and_orphans_are_removed(tmp_path):
    store = JobStore(tmp_path / "state.db")
    seq = _put(store, "big", BIG)
    store.close()
    (tmp_path / "outbox" / "leftover.bin.tmp").write_bytes(b"half a write")
    again = JobStore(tmp_path / "state.db")
    assert again.outbox_batch() == [(seq, "t", BIG, "big", 1)]
    assert sorted(p.suffix for p in (tmp_path / "outbox").iterdir()) == [".bin"]


def test_a_damaged_result_file_is_dropped_and_counted(tmp_path):
    store = JobStore(tmp_path / "state.db")
    _put(store, "cut", BIG)
    keep = _put(store, "fine", b"ok")
    store.close()
    (next((tmp_path / "outbox").iterdir())).write_bytes(BIG[:100])  # cut short: power loss
    again = JobStore(tmp_path / "state.db")
    assert [s for s, *_ in again.outbox_batch()] == [keep]
    assert again.damaged == 1 and again.outbox_size() == 1


def test_the_latest_results_are_sent_from_memory_until_acknowledged(tmp_path):
    """A result is published right after it is written: the latest ones, up to a memory
    budget, are not read back from their files (here removed to prove it) until
    acknowledged; the rest, and all of them after a restart, come from disk."""
    kept = 4
    store = JobStore(tmp_path / "state.db", memory_bytes=kept * (len(BIG) + 1))
    seqs = [_put(store, f"j{i}", BIG + bytes([i])) for i in range(kept + 2)]
    for path in (tmp_path / "outbox").iterdir():
        path.unlink()
    batch = store.outbox_batch()
    assert [(s, p) for s, _, p, _, _ in batch] == [
        (s, BIG + bytes([i])) for i, s in enumerate(seqs[:kept])
    ]
    assert store.damaged == 2  # the two kept on disk only had lost their files
    store.outbox_remove(seqs[0])
    assert [s for s, *_ in store.outbox_batch()] == seqs[1:kept]
    store.close()
    again = JobStore(tmp_path / "state.db")
    assert again.outbox_batch() == [] and again.damaged == kept - 1


def test_a_database_from_before_result_files_is_migrated(tmp_path):
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute(
        "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
        "payload BLOB NOT NULL, job_id TEXT NOT NULL, attempt INTEGER NOT NULL, "
        "created_at REAL NOT NULL)"
    )
    db.execute(
        "INSERT INTO outbox (topic, payload, job_id, attempt, created_at) VALUES "
        "('t', x'0102', 'old', 1, 0)"
    )
    db.commit()
    db.close()
    store = JobStore(tmp_path / "state.db")
    assert [p for _, _, p, _, _ in store.outbox_batch()] == [b"\x01\x02"]
    seq = _put(store, "new", BIG)
    assert store.outbox_batch()[-1] == (seq, "t", BIG, "new", 1)
