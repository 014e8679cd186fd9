"""The output file of a batch run: written as answers complete, presented whole only when it is whole.

While the run goes, each answer is appended (and flushed) to ``OUT.partial``, so a killed run loses nothing it
finished; ``OUT`` itself appears only at the end, written to a temporary file, fsynced and renamed over ``OUT``
in one step (os.replace), in input order. A file named ``OUT`` is therefore always complete; a run that finds
``OUT.partial`` (or ``OUT``) resumes: the answers already there are kept and their custom_ids skipped.

    results = ResultFile("out.jsonl")
    done = results.load()            # {custom_id: output line} from OUT and OUT.partial
    results.append(record)           # as each answer completes
    results.finish(order, by_line)   # OUT, in input order, atomically; OUT.partial removed
"""
from __future__ import annotations

import json
import os

from vlm_core.runtime.batch.lines import is_line_error


class ResultFile:
    """`path` (the finished output) and `path`.partial (the answers so far)."""

    def __init__(self, path: str):
        self.path = path
        self.partial = path + ".partial"
        self.done: dict[str, dict] = {}  # custom_id -> output line, in the order they were written
        self._file = None

    def load(self) -> dict:
        """The answers of earlier runs (OUT, then OUT.partial; a line cut short by a kill is dropped), and
        OUT.partial rewritten to hold exactly them, ready to append to. Line errors are not kept."""
        for source in (self.path, self.partial):
            for record in _read_records(source):
                custom_id = record.get("custom_id")
                if isinstance(custom_id, str) and not is_line_error(record):
                    self.done.setdefault(custom_id, record)
        _write_atomically(self.partial, self.done.values(), durable=False)
        self._file = open(self.partial, "a", encoding="utf-8")  # noqa: SIM115 (kept open for appends; close())
        return dict(self.done)

    def append(self, record: dict) -> None:
        """Keep one output line: appended to OUT.partial and flushed (a kill after this loses nothing)."""
        if self._file is None:
            raise RuntimeError("ResultFile.load() first")
        self._file.write(_line(record))
        self._file.flush()
        custom_id = record.get("custom_id")
        if isinstance(custom_id, str) and not is_line_error(record):
            self.done.setdefault(custom_id, record)

    def finish(self, order: list, by_line: dict) -> int:
        """Write OUT atomically and remove OUT.partial; returns the number of lines written.

        Args:
            order: one (line number, custom_id or None) per input request line, in input order; a custom_id
                names an answer in `done`, None a record of `by_line`.
            by_line: line number -> output line of the lines answered by line (line errors, repeated custom_ids).
        """
        if self._file is not None:
            self._file.close()
            self._file = None
        records, used = [], set()
        for line, custom_id in order:
            if custom_id is None:
                records.append(by_line[line])
            elif custom_id in self.done and custom_id not in used:
                records.append(self.done[custom_id])
                used.add(custom_id)
        records += [r for c, r in self.done.items() if c not in used]  # answers to lines no longer in the input
        _write_atomically(self.path, records, durable=True)
        os.remove(self.partial)
        return len(records)

    def close(self) -> None:
        """Stop appending (the partial file stays, for the next run to resume from)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


def _read_records(path: str):
    """The JSON objects of a results file, skipping a line that does not parse (cut short by a kill)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for text in f:
            try:
                record = json.loads(text)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


def _write_atomically(path: str, records, durable: bool) -> None:
    """Write `records` to `path` through a temporary file renamed over it: readers see the old file or the new
    one, never a part. `durable`: fsync the file and its folder, so the rename survives a power cut too."""
    folder = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        f.writelines(_line(record) for record in records)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(temporary, path)
    if durable:
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
