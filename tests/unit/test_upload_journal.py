"""The node-local journal of a stage-out's open multipart uploads (hpcstage.store.recycle)."""

from __future__ import annotations

import stat
from pathlib import Path

from hpcstage.store.recycle import UploadJournal


def test_a_journal_lists_what_is_open_per_bucket_and_forgets_what_ended(tmp_path: Path) -> None:
    mine = UploadJournal(tmp_path / "uploads" / "42", "results")
    assert mine.pending() == []
    mine.opened("out/a.bin", "id-1")
    mine.opened("out/b.bin", "id-2")
    UploadJournal(tmp_path / "uploads" / "42", "other").opened("out/a.bin", "id-3")
    assert sorted(mine.pending()) == [("out/a.bin", "id-1"), ("out/b.bin", "id-2")]
    mine.closed("id-1")
    mine.closed("id-1")  # idempotent
    assert mine.pending() == [("out/b.bin", "id-2")]
    for directory in (tmp_path / "uploads", tmp_path / "uploads" / "42"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700  # keys are nobody else's


def test_a_torn_entry_is_skipped_and_an_empty_journal_is_removed(tmp_path: Path) -> None:
    journal = UploadJournal(tmp_path / "uploads" / "7", "results")
    journal.opened("k", "id")
    (tmp_path / "uploads" / "7" / "torn.json").write_text('{"bucket": "resu')
    assert journal.pending() == [("k", "id")]
    journal.tidy()
    assert (tmp_path / "uploads" / "7").exists()  # not empty yet
    (tmp_path / "uploads" / "7" / "torn.json").unlink()
    journal.closed("id")
    journal.tidy()
    assert not (tmp_path / "uploads" / "7").exists()
