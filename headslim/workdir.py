"""A work dir the user names, where a layer-at-a-time shrink keeps what it has finished, so that an
interrupted run resumes after the last layer it completed instead of starting again.

Every headslim command leaves nothing behind when it is interrupted; a run over a model larger than
memory can take hours, so ``headslim shrink --layerwise --work-dir DIR`` asks for the opposite in a
place the user chose. After each layer, :meth:`WorkDir.commit` records in ``DIR``:

- the layer's shard (pass 2, written there instead of the output's temporary dir);
- the carried streams (the calibration batches' hidden states after that layer: the dense one in
  pass 1; dense, pruned and the held-out "before" in pass 2) in one safetensors file, written in
  bounded chunks;
- ``headslim-work.json``: what is done (pass, layers done, scores, plan, repair entries) and the
  run's fingerprint: the source weights (file names, sizes, modification times), the settings and a
  hash of the calibration batches.

The manifest is replaced last (write to a ``.partial`` file, then an atomic rename) and names its
streams file, so a run killed at any moment leaves a consistent state: the last committed layer,
plus perhaps ``.partial`` files and an unreferenced streams file, which the next run removes.
A run with another fingerprint is refused in one line. When the output is in place, the run
removes what it wrote in ``DIR`` (and ``DIR`` itself when the run made it).

Resuming gives the same output, bit for bit, as an uninterrupted run (the state carried from layer
to layer is exactly what is saved; ``tests/test_offload.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from headslim.errors import HeadslimError
from headslim.layerwise import Store, write_streamed

MANIFEST = "headslim-work.json"
FORMAT = 1
_OURS = re.compile(r"(headslim-work\.json|streams-\d+-\d+\.safetensors|model-\d{5}-of-\d{5}\.safetensors)(\.partial)?")


def batches_sha256(batches: list[dict]) -> str:
    """A hash of the calibration batches' tensors (keys, dtypes, shapes and values), in order."""
    h = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            t = batch[key].detach().cpu().contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def files_fingerprint(path: Path, names: list[Path]) -> list[list]:
    """``[name, bytes, modification time in ns]`` of each file: changed weights are noticed without hashing them."""
    return [[str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(names)]


class WorkDir:
    """The state of an interrupted run kept in ``path`` (see the module docstring).

    Args:
        path: the work dir; made when missing. An existing one must be empty or hold a run with the
            same ``fingerprint``; anything else is refused in one line, and nothing in it is touched.
        fingerprint: JSON-able description of the run (source weights, settings, calibration hash).

    ``state`` is the last committed state (None: nothing done yet). Use as a context manager: on a
    clean exit call :meth:`finish`; on an error or interrupt the committed state stays.
    """

    def __init__(self, path: str | Path, fingerprint: dict):
        path = Path(path)
        self.path, self.fingerprint, self.created = path, json.loads(json.dumps(fingerprint)), False
        self.state: dict | None = None
        self._streams: str | None = None
        if path.exists() and not path.is_dir():
            raise HeadslimError(f"--work-dir {path} exists and is not a directory")
        manifest = path / MANIFEST
        if manifest.is_file():
            try:
                data = json.loads(manifest.read_text())
                old, state, fmt = data["fingerprint"], data["state"], data["format"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise HeadslimError(f"--work-dir {path}: {MANIFEST} is unreadable; remove the directory to start "
                                    "again") from None
            if fmt != FORMAT:
                raise HeadslimError(f"--work-dir {path} was written by another headslim work-dir format ({fmt})")
            differ = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
            if differ:
                raise HeadslimError(f"--work-dir {path} holds a run with other {', '.join(differ)}; rerun with "
                                    "the same model, settings and calibration data, or give another --work-dir")
            self.state, self._streams, self.created = state, data.get("streams"), bool(data.get("created"))
            self._remove_stray()
            return
        if path.is_dir() and any(path.iterdir()):
            raise HeadslimError(f"--work-dir {path} is not empty and holds no headslim run; give an empty or new "
                                "directory")
        if not path.exists():
            path.mkdir(parents=True)
            self.created = True
        self._write_manifest()  # from now on the directory is recognisably a headslim run's

    # ---- state -------------------------------------------------------------------------------

    def shard(self, name: str) -> Path:
        """Where a layer shard is written (it outlives an interrupted run)."""
        return self.path / name

    def streams(self, spill=None, device=None) -> dict[str, Store]:
        """The committed carried streams, each a :class:`Store` kept by ``spill`` (read one batch at a time,
        onto ``device``: the CPU by default)."""
        from safetensors import safe_open

        if self._streams is None:
            return {}
        out: dict[str, Store] = {}
        with safe_open(str(self.path / self._streams), framework="pt", device=str(device or "cpu")) as f:
            for key in sorted(f.keys(), key=lambda k: (k.rsplit(".", 1)[0], int(k.rsplit(".", 1)[1]))):
                out.setdefault(key.rsplit(".", 1)[0], Store(spill)).append(f.get_tensor(key))  # batches in order
        return out

    def commit(self, state: dict, streams: dict[str, Store] | None = None) -> None:
        """Record ``state`` (JSON-able) and the ``streams`` it goes with; the manifest is replaced last."""
        old = self._streams
        new = None
        if streams:
            new = f"streams-{state.get('pass', 0)}-{state.get('layers_done', 0)}.safetensors"
            tensors = [(f"{name}.{i}", *store.meta(i), _item(store, i)) for name, store in streams.items()
                       for i in range(len(store))]
            partial = self.path / (new + ".partial")
            write_streamed(partial, tensors)
            os.replace(partial, self.path / new)
        self.state, self._streams = state, new
        self._write_manifest()
        if old is not None and old != new:
            (self.path / old).unlink(missing_ok=True)

    def finish(self) -> None:
        """Remove what this run wrote in the work dir, and the dir itself when a run made it."""
        for f in self.path.iterdir():
            if _OURS.fullmatch(f.name) and f.is_file():
                f.unlink()
        if self.created and not any(self.path.iterdir()):
            self.path.rmdir()

    def _write_manifest(self) -> None:
        partial = self.path / (MANIFEST + ".partial")
        partial.write_text(json.dumps({"format": FORMAT, "fingerprint": self.fingerprint, "state": self.state,
                                       "streams": self._streams, "created": self.created}) + "\n")
        os.replace(partial, self.path / MANIFEST)

    def _remove_stray(self) -> None:
        """``.partial`` files and streams files the manifest does not name: left by a killed run."""
        for f in self.path.iterdir():
            if not (_OURS.fullmatch(f.name) and f.is_file()):
                continue
            if f.name.endswith(".partial") or (f.name.startswith("streams-") and f.name != self._streams):
                f.unlink()


def _item(store: Store, i: int):
    def chunks():
        yield store[i]
    return chunks
