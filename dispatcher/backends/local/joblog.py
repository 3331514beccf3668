"""A run's log on the local backend, kept under its app's `max_log_bytes`.

The job runner (`jobrunner.py`) reads the model's stdout and stderr from a
pipe and writes them to job.log through `CappedLog`. Past the cap the oldest
output goes and the newest stays: the log is rewritten (atomically, so a
reader never sees it empty) to its last half, after a line saying how much
was dropped, so a model writing 200 MB leaves at most the cap on disk and
the log tail, which users read, is always the end of the run. Rewriting
half the cap each time the log doubles back to the cap copies each byte
about once more, whatever the flood.

Some room under the cap (`NOTE_ROOM`) is left for the lines spinyard itself
adds when the run ends (`JobDir.note`). Only the standard library and
`processes`, like the runner.
"""

import os
from pathlib import Path

from dispatcher.backends.local import processes

NOTE_ROOM = 4096  # bytes under the cap kept for spinyard's own closing notes
MIN_BYTES = 64 * 1024  # the smallest cap the spec allows


class CappedLog:
    """Appends to a log file, dropping its oldest part whenever it would pass `max_bytes`."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.limit = max(MIN_BYTES, max_bytes) - NOTE_ROOM
        self.dropped = 0  # bytes of output dropped so far
        self._file = processes.open_log(path)

    def write(self, data: bytes) -> None:
        size = os.fstat(self._file.fileno()).st_size
        if size + len(data) > self.limit:
            self._compact(data)
        else:
            self._file.write(data)
            self._file.flush()

    def close(self) -> None:
        self._file.close()

    def _compact(self, data: bytes) -> None:
        """Rewrite the log as a note and the newest half of (log + data), from a line start."""
        keep = self.limit // 2
        with open(self.path, "rb") as old:
            size = old.seek(0, os.SEEK_END)
            old.seek(max(0, size - max(0, keep - len(data))))
            tail = old.read() + data[-keep:]
        cut = tail.find(b"\n", 0, len(tail) // 2) + 1  # start at a line if one starts early
        kept = tail[cut:]
        self.dropped += size + len(data) - len(kept)
        note = f"[spinyard] {self.dropped} bytes of earlier output dropped: the log is capped\n"
        processes.write_atomic(self.path, note.encode() + kept)
        self._file.close()
        self._file = processes.open_log(self.path)
