"""A whole slide's run, resumable after a kill: what is done lives in ``<output_dir>/.<stem>.partial/``.

The slide's outputs (GeoJSON, CSV, overlay) appear only when the slide is complete, each written atomically. Until
then its nuclei go into the partial folder as they are found, one tile at a time:

- ``features.jsonl``: one GeoJSON feature per line; ``rows.csv``: the CSV rows without header;
- ``thumb_inst.npy`` / ``thumb_type.npy``: the overlay thumbnail's label maps (memory-mapped, painted in place);
- ``state.json``: the run's key (slide file, size, modification time, settings, model) and, at the last
  checkpoint, the tiles done, the number of nuclei and the byte length of the two text files.

A checkpoint follows every tile (files flushed to disk, then ``state.json`` replaced atomically). A rerun with the same
key truncates the text files to the checkpoint's lengths (dropping the rows of a tile cut short) and goes on with
the tiles not done, numbering nuclei from the checkpoint's count; the thumbnail pixels a cut tile had painted are
painted again by its rerun. A partial folder with another key (the slide file or the settings changed) is
discarded with a log line. Coordinates: tile positions are (x, y) level pixels.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from monai.apps.utils import get_logger

from scripts.io.atomic import atomic_open
from scripts.io.measurements import TABLE_COLUMNS
from scripts.io.writers import GeoJSONWriter, csv_cell, feature_json

logger = get_logger("scripts.io.slide_progress")


def partial_folder(output_dir: str | Path, stem: str) -> Path:
    """The folder holding the unfinished run of slide ``stem``."""
    return Path(output_dir) / f".{stem}.partial"


def slide_run_key(path: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """What must not change for a run to be resumed: the slide file (resolved path, size, mtime) and ``settings``
    (JSON-serialisable: the slide options, the pipeline options, the model's fingerprint)."""
    stat = path.stat()
    return json.loads(json.dumps({"slide": str(path.resolve()), "bytes": stat.st_size,
                                  "mtime_ns": stat.st_mtime_ns, "settings": settings}, default=str))


class SlideProgress:
    """The resumable state of one slide's run (see the module docstring). Use :meth:`open`."""

    def __init__(self, folder: Path, key: dict[str, Any], class_table: Mapping[int, Mapping],
                 thumb_shape: tuple[int, int]) -> None:
        self.folder, self.key, self.class_table = folder, key, class_table
        self.done: set[tuple[int, int]] = set()
        self.count = 0
        resumed = self._load_state()
        mode = "r+" if resumed else "w+"
        self.thumb_inst = np.lib.format.open_memmap(folder / "thumb_inst.npy", mode, np.int32, thumb_shape)
        self.thumb_type = np.lib.format.open_memmap(folder / "thumb_type.npy", mode, np.int32, thumb_shape)
        if self.thumb_inst.shape != tuple(thumb_shape):
            raise ValueError(f"{folder}: thumbnail shape {self.thumb_inst.shape} differs from {thumb_shape}")
        self._features = open(folder / "features.jsonl", "r+b" if resumed else "w+b")
        self._rows = open(folder / "rows.csv", "r+" if resumed else "w+", newline="", encoding="utf-8")
        if resumed:
            self._features.truncate(self._state_sizes[0])
            self._rows.truncate(self._state_sizes[1])
            self._features.seek(0, os.SEEK_END)
            self._rows.seek(0, os.SEEK_END)
        self._csv = csv.DictWriter(self._rows, fieldnames=list(TABLE_COLUMNS), extrasaction="ignore")

    @classmethod
    def open(cls, output_dir: str | Path, stem: str, key: dict[str, Any], class_table: Mapping[int, Mapping],
             thumb_shape: tuple[int, int]) -> "SlideProgress":
        """The run of slide ``stem`` under ``key``: resumed from its partial folder when the key matches, new
        otherwise (a partial folder with another key is discarded, with a log line)."""
        folder = partial_folder(output_dir, stem)
        state = folder / "state.json"
        if folder.exists() and not (state.is_file() and _read_json(state).get("key") == key):
            logger.warning("%s: discarding an unfinished run (no checkpoint, or another slide file or other settings)",
                           folder)
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return cls(folder, key, class_table, thumb_shape)

    def _load_state(self) -> bool:
        state_path = self.folder / "state.json"
        if not state_path.is_file():
            self._state_sizes = (0, 0)
            return False
        state = _read_json(state_path)
        self.done = {tuple(p) for p in state["done"]}
        self.count = int(state["count"])
        self._state_sizes = (int(state["features_bytes"]), int(state["rows_bytes"]))
        logger.info("%s: resuming after %d tiles (%d nuclei)", self.folder, len(self.done), self.count)
        return True

    @property
    def resumed(self) -> bool:
        """Whether tiles were done before this process started."""
        return bool(self.done)

    def add_tile(self, position: tuple[int, int], polygons: Mapping[int, Any], table: list[dict]) -> None:
        """Record one finished tile at level (x, y) ``position``: its nuclei (rows of ``table`` with
        ``polygons[row["id"]]``), then a checkpoint. Its thumbnail pixels are painted by the caller beforehand."""
        for row in table:
            line = feature_json(polygons[row["id"]], row, self.class_table)
            self._features.write(line.encode("utf-8") + b"\n")
            self._csv.writerow({c: csv_cell(row[c]) for c in TABLE_COLUMNS})
        self.done.add(tuple(int(v) for v in position))
        self.count += len(table)
        self._checkpoint()

    def _checkpoint(self) -> None:
        for f in (self._features, self._rows):
            f.flush()
            os.fsync(f.fileno())
        self.thumb_inst.flush()
        self.thumb_type.flush()
        state = {"key": self.key, "done": sorted(self.done), "count": self.count,
                 "features_bytes": self._features.tell(), "rows_bytes": self._rows.tell()}
        with atomic_open(self.folder / "state.json", "w", fsync=True, encoding="utf-8") as f:
            json.dump(state, f)

    def write_outputs(self, geojson_path: Path, csv_path: Path, properties: Mapping[str, Any] | None = None) -> None:
        """Write the slide's GeoJSON (with the collection's ``properties``) and CSV, atomically, from the recorded
        nuclei."""
        self._features.seek(0)
        with GeoJSONWriter(geojson_path, self.class_table, properties=properties) as geo:
            for line in self._features:
                geo.add_json(line.decode("utf-8").rstrip("\n"))
        self._features.seek(0, os.SEEK_END)
        self._rows.seek(0)
        with atomic_open(csv_path, "w", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=list(TABLE_COLUMNS)).writeheader()
            shutil.copyfileobj(self._rows, f)
        self._rows.seek(0, os.SEEK_END)

    def close(self) -> None:
        """Close the files (the partial folder stays for a resume)."""
        self._features.close()
        self._rows.close()
        del self.thumb_inst, self.thumb_type

    def remove(self) -> None:
        """Close and delete the partial folder (after the slide's outputs are all written)."""
        self.close()
        shutil.rmtree(self.folder)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logger.warning("%s: unreadable (%s); the slide starts again", path, error)
        return {}

