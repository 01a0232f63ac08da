"""``predict``'s output as results are made: a line per image in input order, a JSON line appended to
``OUT/predictions.jsonl`` (flushed, so a crash or Ctrl-C keeps every finished result), and a progress bar on a
terminal. 965 images take minutes on a small CPU; nothing should wait for the last one to show the first.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


class ResultStream:
    """Receives results in completion order, emits them in input order, and says what was left on an interrupt."""

    def __init__(self, total: int, render: Callable[[Any], str], out_dir: Path | None, json_lines: bool,
                 per_result: Callable[[Any], None] | None = None, progress: bool | None = None):
        self.total = total
        self.render = render
        self.json_lines = json_lines
        self.per_result = per_result  # e.g. predict --dicom-out: the DICOM objects of each result as it is made
        self.pending: dict[int, Any] = {}
        self.emitted: list[Any] = []
        self.out_dir = out_dir
        self.jsonl: IO[str] | None = None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / "predictions.jsonl"
            if path.exists() and path.stat().st_size:  # an earlier run's results are kept, never truncated
                import time

                kept = path.with_name(f"predictions.{time.strftime('%Y%m%d-%H%M%S', time.localtime(path.stat().st_mtime))}"
                                      f".{os.getpid()}.jsonl")
                os.replace(path, kept)
                print(f"note: the earlier {path.name} in {out_dir} is kept as {kept.name}", file=sys.stderr)
            self.jsonl = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())
        show = sys.stderr.isatty() if progress is None else progress
        self.bar = None
        if show and total > 1:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc="screening", file=sys.stderr, leave=False)

    def __call__(self, result) -> None:
        self.pending[result.index] = result
        if self.bar is not None:
            self.bar.update(1)
        while len(self.emitted) in self.pending:
            self._emit(self.pending.pop(len(self.emitted)))

    def _emit(self, r) -> None:
        self.emitted.append(r)
        doc = r.to_dict()
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(doc) + "\n")
            self.jsonl.flush()
        text = json.dumps(doc) if self.json_lines else self.render(r)
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)
        if self.per_result is not None and r.ok:
            self.per_result(r)

    def close(self, interrupted: bool = False) -> list[Any]:
        """Flush what finished (out-of-order results after the first gap too), write predictions.json, and return
        the results in input order."""
        for k in sorted(self.pending):  # finished after an unfinished one: kept, not lost
            self._emit(self.pending.pop(k))
        if self.bar is not None:
            self.bar.close()
        done = sorted(self.emitted, key=lambda r: r.index)
        if self.jsonl is not None:
            self.jsonl.flush()
            os.fsync(self.jsonl.fileno())
            self.jsonl.close()
            doc: Any = [r.to_dict() for r in done]
            if interrupted:
                doc = {"interrupted": True, "screened": len(done), "total": self.total, "results": doc}
            assert self.out_dir is not None
            (self.out_dir / "predictions.json").write_text(json.dumps(doc, indent=2) + "\n")
        return done

    def interrupted_message(self) -> str:
        n = len(self.emitted)
        where = f"; results so far are in {self.out_dir / 'predictions.jsonl'}" if self.out_dir else ""
        return f"interrupted: {n} of {self.total} images screened, {self.total - n} left{where}"
