"""Keep the plan registry in step with a plan folder: ``fusesteer serve --plans DIR --watch``.

Several independent servers (replicas behind a load balancer) that watch one folder serve the same plans. The
folder is polled (stdlib only, every ``interval`` seconds) on a thread of its own, which also reads and validates
the files (the upload path's bounded, data-only loaders); the event loop and the engine loop never wait on it,
and the engine only writes a new plan into the plan table between two forwards, as for an upload.

Rules (README, "Plan folders and replicas"):

- A plan is named by its file's stem; ``*.safetensors`` (fusesteer plans) and ``*.gguf`` (control vectors). Two
  files with one stem: the first in sorted order (``x.gguf`` before ``x.safetensors``) is used, the other
  ignored with a warning.
- A file is read once its size, times and inode are the same at two polls in a row, and again after reading (a
  file still being written is not read; a rename into place is atomic). A file that disappears is removed once
  it is still missing at the next poll (a delete-then-write is seen as a replacement).
- New file -> new plan. Changed file -> new version of the plan (requests in flight keep the version they
  started with, as for a DELETE through the API). Deleted file -> the plan is removed.
- A bad file (unreadable, over ``--max-plan-bytes`` / ``--max-plan-entries``, not a plan, for another model) is
  never loaded half: it is refused with a log line. If the name has a usable plan, that plan keeps serving;
  otherwise the name is listed as unusable with the reason, as at start-up. It is retried when the file changes.
- Names shared with uploads: a file that appears or changes takes its name, replacing a plan uploaded through
  the API (logged). An upload with ``?replace=true`` over a folder plan serves until the file next changes;
  deleting the file then leaves the uploaded plan. Plans whose names no file has are never touched.
- If the folder cannot be listed, nothing is removed (logged once); the watcher keeps polling.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from ..errors import PlanError
from .registry import NAME_RE, PLAN_SUFFIXES, PlanRecord, PlanRegistry, Steering, effective_plan

log = logging.getLogger("fusesteer.serve")

_UNSEEN = object()


class _Changed(Exception):
    """The file changed while it was read: try again once it is stable."""


def _sig(st: os.stat_result) -> tuple:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


class PlanWatcher:
    """Mirror a folder's plan files into a :class:`PlanRegistry`. :meth:`load` reads the folder once (start-up),
    :meth:`poll` applies what changed since, :meth:`start` polls on a background thread."""

    def __init__(self, registry: PlanRegistry, folder: str | os.PathLike, interval: float = 1.0):
        self.registry = registry
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise PlanError(f"--plans {str(self.folder)!r} is not a folder")
        if not interval > 0:
            raise ValueError(f"the watch interval must be positive, got {interval!r}")
        self.interval = float(interval)
        self.polls = 0
        self._applied: dict[str, tuple] = {}  # name -> (path, signature) last acted on (loaded or refused)
        self._owned: dict[str, int] = {}  # name -> the registry version this folder put there
        self._pending: dict[str, tuple | None] = {}  # name -> state seen at the last poll, not acted on yet
        self._warned: set[str] = set()
        self._listing_failed = False
        self._engine = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- scanning --------------------------------------------------------------------------------
    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def _scan(self) -> dict[str, tuple] | None:
        """name -> (path, signature) of the folder's plan files now; None if the folder cannot be listed."""
        try:
            with os.scandir(self.folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if not self._listing_failed:
                log.warning("plan folder %s cannot be listed (%s); its plans are kept, retrying", self.folder, e)
            self._listing_failed = True
            return None
        if self._listing_failed:
            log.info("plan folder %s can be listed again", self.folder)
            self._listing_failed = False
        out: dict[str, tuple] = {}
        present = set()
        for e in entries:
            path = Path(e.path)
            if path.suffix not in PLAN_SUFFIXES:
                continue
            try:
                if not e.is_file():
                    continue
                st = e.stat()
            except OSError:  # gone between listing and stat: seen at the next poll
                continue
            present.add(e.name)
            name = path.stem
            if not NAME_RE.fullmatch(name):
                self._warn_once(e.name, "skipping %s: plan name %r is invalid: use 1-64 characters from letters, "
                                "digits, '.', '_' and '-', starting with a letter or digit", path, name)
                continue
            if name in out:
                self._warn_once(e.name, "skipping %s: plan %r comes from %s", path, name, out[name][0].name)
                continue
            out[name] = (path, _sig(st))
        self._warned &= present  # a file that comes back is warned about again
        return out

    def _read(self, path: Path, sig: tuple) -> bytes:
        """The file's bytes, bounded by the registry's byte limit; _Changed if it is not the file ``sig`` saw."""
        cap = self.registry.max_plan_bytes
        if sig[0] > cap:
            raise PlanError(f"{path}: {sig[0]} bytes, over the {cap} byte limit (--max-plan-bytes)")
        with open(path, "rb") as f:
            if _sig(os.fstat(f.fileno())) != sig:
                raise _Changed()
            data = f.read(cap + 1)
        if len(data) > cap:
            raise PlanError(f"{path}: over the {cap} byte limit (--max-plan-bytes)")
        if _sig(os.stat(path)) != sig:
            raise _Changed()
        return data

    # ---- applying --------------------------------------------------------------------------------
    def poll(self, settle: bool = True) -> list[str]:
        """Apply the folder's changes since the last poll; returns the names acted on. With ``settle`` a state
        must be seen by two polls in a row before it is acted on; without, everything is acted on now."""
        self.polls += 1
        seen = self._scan()
        if seen is None:
            return []
        done = []
        for name in sorted(set(seen) | set(self._applied)):
            now = seen.get(name)
            if now == self._applied.get(name):
                self._pending.pop(name, None)
                continue
            if settle and self._pending.get(name, _UNSEEN) != now:
                self._pending[name] = now  # first sight of this state: act if the next poll sees it unchanged
                continue
            self._pending.pop(name, None)
            try:
                if now is None:
                    self._remove(name)
                else:
                    self._load(name, *now)
                done.append(name)
            except _Changed:  # not recorded as applied: read once it has been stable for two polls
                log.info("plan %r: %s changed while it was read; not loaded yet", name, now[0])
        return done

    def load(self) -> list[PlanRecord]:
        """Read every plan file in the folder now (start-up); the records of the folder's names."""
        names = self.poll(settle=False)
        recs = [self.registry.get(n) for n in names]
        return [r for r in recs if r is not None]

    def _load(self, name: str, path: Path, sig: tuple) -> None:
        src = f"dir:{path}"
        prev = self.registry.get(name)
        try:
            data = self._read(path, sig)
            rec = self.registry.add_bytes(name, data, source=src, replace=True)
        except (PlanError, OSError) as e:
            self._applied[name] = (path, sig)  # retried when the file changes
            if prev is not None and prev.plan is not None:
                log.warning("plan %r: %s refused, the previous version (%d, from %s) keeps serving: %s", name, path,
                            prev.version, prev.source, e)
                return
            log.warning("plan %r from %s is not usable: %s", name, path, e)
            bad = self.registry.add_unusable(name, src, str(e))
            if bad is not None:
                self._owned[name] = bad.version
            return
        if prev is not None and prev.version != self._owned.get(name):
            log.warning("plan %r: %s replaces the plan of that name uploaded through the API", name, path)
        elif prev is not None:
            log.info("plan %r: %s changed; version %d replaces version %d", name, path, rec.version, prev.version)
        self._owned[name] = rec.version
        self._applied[name] = (path, sig)
        if self._engine is not None:  # into a free plan-table slot between two forwards, as an upload
            st = Steering(((rec, 1.0),))
            self._engine.preload(st, effective_plan(st))

    def _remove(self, name: str) -> None:
        path = self._applied.pop(name)[0]
        version = self._owned.pop(name, None)
        if version is not None and self.registry.delete_version(name, version) is not None:
            log.info("plan %r removed: %s was deleted", name, path)
        elif self.registry.get(name) is not None:
            log.info("%s was deleted; plan %r stays (it was uploaded through the API since)", path, name)

    # ---- background thread -----------------------------------------------------------------------
    def start(self, engine=None) -> PlanWatcher:
        """Poll every ``interval`` seconds on a daemon thread; new plans are preloaded into ``engine``."""
        self._engine = engine
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="fusesteer-watch", daemon=True)
            self._thread.start()
            log.info("watching %s for plan files every %g s", self.folder, self.interval)
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad poll
                log.exception("plan folder watcher: a poll of %s failed; retrying", self.folder)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5 * self.interval + 5)
            self._thread = None
