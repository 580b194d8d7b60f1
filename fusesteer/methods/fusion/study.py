"""The Optuna study runner: storage, heartbeats, resumable ask/tell loop. The only module that
touches Optuna's private API."""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ...extras import require
from .prompts import FusionError

log = logging.getLogger("fusesteer")


# --------------------------------------------------------------------------------------------
# Optuna studies
# --------------------------------------------------------------------------------------------
def _optuna():
    optuna = require("optuna", "methods", "the per-prompt Fusion Steering search")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def make_storage(url: str | os.PathLike | None, *, heartbeat_interval: int | None = 10,
                 grace_period: int | None = None):
    """An Optuna storage: None → in memory (one process, no resume); a ``scheme://`` URL → RDBStorage;
    anything else is taken as a SQLite file path. RDB storages record heartbeats every
    ``heartbeat_interval`` s (None disables them); trials silent for ``grace_period`` s (default 2×) are stale.
    """
    optuna = _optuna()
    if url is None:
        return optuna.storages.InMemoryStorage()
    url = os.fspath(url)
    if "://" not in url:
        url = "sqlite:///" + os.path.abspath(url)
    kw: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if path and path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kw["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_interval,
                                              grace_period=grace_period, **kw)
    except Exception as e:  # noqa: BLE001 - one clear message
        raise FusionError(f"cannot open the optuna storage {_safe_url(url)!r}: {type(e).__name__}: {e}") from None


def _safe_url(url) -> str:
    if url is None:
        return "memory"
    try:
        from sqlalchemy.engine import make_url

        return make_url(str(url)).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", str(url))


def study_name(dataset: str, record_id: str, mode: str, variant: str = "explanation", blend: str = "paper",
               gating: str = "all") -> str:
    """``fusion:{dataset}:{record id}:{mode}:{variant}:{blend}:{gating}``."""
    return f"fusion:{dataset}:{record_id}:{mode}:{variant}:{blend}:{gating}"


class _Heartbeat:
    """Records Optuna heartbeats for the trials being run (a daemon thread)."""

    def __init__(self, storage, interval: float):
        self.storage, self.interval = storage, interval
        self.ids: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="fusesteer-heartbeat")
        self._thread.start()

    def watch(self, ids: Sequence[int]) -> None:
        with self._lock:
            self.ids = list(ids)
        self._beat()

    def _beat(self) -> None:
        with self._lock:
            ids = list(self.ids)
        for tid in ids:
            try:
                self.storage.record_heartbeat(tid)
            except Exception as e:  # noqa: BLE001 - a missed beat only risks a stale mark later
                log.debug("heartbeat for trial %s failed: %s", tid, e)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _jsonable(x):
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def run_study(evaluate: Callable[[list[dict]], list[tuple[float, dict]]], space: Mapping[str, tuple[float, float]],
              *, study_name: str, storage=None, n_trials: int, seed: int = 0, batch_size: int = 1,
              config: Mapping | None = None, fail_running: bool = False, poll_interval: float = 0.5,
              worker: int = 0, n_startup_trials: int | None = None, progress: bool = True,
              desc: str | None = None, position: int | None = None):
    """Run (or resume, or join) a study until it holds ``n_trials`` COMPLETE trials; returns the study.

    ``evaluate(params_list) -> [(value, user_attrs), ...]`` scores a batch of parameter dicts (maximised).
    ``space``: {name: (low, high[, log])} sampled with ``suggest_float``. ``storage``: an Optuna storage, a URL,
    a SQLite path or None (in memory). ``config``: the objective's settings, stored in the study on
    creation; reloading with different settings raises :class:`FusionError`. See the module docstring
    for the exact-count, heartbeat and resume rules.
    """
    optuna = _optuna()
    from optuna.trial import TrialState

    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise FusionError(f"n_trials must be a positive integer, got {n_trials!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FusionError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not space:
        raise FusionError("empty search space")
    st = storage if isinstance(storage, optuna.storages.BaseStorage) else make_storage(storage)
    try:
        study = optuna.create_study(study_name=study_name, storage=st, direction="maximize", load_if_exists=True)
    except Exception as e:  # noqa: BLE001
        raise FusionError(f"cannot create or load study {study_name!r}: {type(e).__name__}: {e}") from None
    if list(study.directions) != [optuna.study.StudyDirection.MAXIMIZE]:
        raise FusionError(f"study {study_name!r} exists with direction(s) {study.directions}; expected maximize")
    if config is not None:
        cfg = _jsonable(dict(config))
        old = study.user_attrs.get("fusesteer_config")
        if old is None:
            study.set_user_attr("fusesteer_config", cfg)
        elif old != cfg:
            diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
            raise FusionError(f"study {study_name!r} was created with other settings ({', '.join(diff)} differ: "
                              f"{ {k: old.get(k) for k in diff} } vs { {k: cfg.get(k) for k in diff} }); use another "
                              f"storage or study, or the same settings")
    storage_obj = study._storage
    from optuna.storages._heartbeat import is_heartbeat_enabled

    hb_enabled = is_heartbeat_enabled(storage_obj)

    def fail_stale():
        if hb_enabled:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optuna.storages.fail_stale_trials(study)

    if fail_running:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            try:
                storage_obj.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except Exception:  # noqa: BLE001 - finished by another process meanwhile
                pass
    fail_stale()
    existing = len(study.get_trials(deepcopy=False))
    base_seed = int(hashlib.sha256(f"{int(seed)}:{study_name}".encode()).hexdigest()[:8], 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.sampler = optuna.samplers.TPESampler(
            seed=(base_seed + 7919 * int(worker) + existing) % (2 ** 32), multivariate=True, constant_liar=True,
            n_startup_trials=n_startup_trials if n_startup_trials is not None else max(2, n_trials // 3))
    heartbeat = _Heartbeat(storage_obj, storage_obj.get_heartbeat_interval()) if hb_enabled else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_trials, desc=desc or study_name, unit="trial", leave=False, position=position)
    waited_msg = False
    try:
        while True:
            fail_stale()
            trials = study.get_trials(deepcopy=False)
            complete = sum(t.state == TrialState.COMPLETE for t in trials)
            if bar is not None:
                bar.n = min(complete, n_trials)
                best = [t.value for t in trials if t.state == TrialState.COMPLETE]
                if best:
                    bar.set_postfix_str(f"best={max(best):.3f}")
                bar.refresh()
            if complete >= n_trials:
                break
            live = complete + sum(t.state == TrialState.RUNNING for t in trials)
            room = n_trials - live
            if room <= 0:
                if not waited_msg:
                    log.info("study %s: waiting for %d RUNNING trial(s) of other workers (stale ones fail after "
                             "their heartbeat grace period; fail_running=True if no other worker is alive)",
                             study_name, live - complete)
                    waited_msg = True
                time.sleep(poll_interval)
                continue
            with warnings.catch_warnings():  # "heartbeat is supposed to be used with Study.optimize": we beat
                warnings.simplefilter("ignore")
                asked = [study.ask() for _ in range(min(batch_size, room))]
            if heartbeat is not None:  # beat at once: a trial without any heartbeat never turns stale
                heartbeat.watch([t._trial_id for t in asked])
            live_numbers = sorted(t.number for t in study.get_trials(
                deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)))
            run = []
            for t in asked:
                if bisect.bisect_left(live_numbers, t.number) < n_trials:
                    run.append(t)
                else:
                    t.set_user_attr("surplus", True)
                    study.tell(t, state=TrialState.PRUNED)
            if not run:
                time.sleep(poll_interval)
                continue
            params = [{k: t.suggest_float(k, float(sp[0]), float(sp[1]), log=bool(sp[2]) if len(sp) > 2 else False)
                       for k, sp in space.items()} for t in run]
            if heartbeat is not None:
                heartbeat.watch([t._trial_id for t in run])
            try:
                results = evaluate(params)
                if not isinstance(results, (list, tuple)) or len(results) != len(run):
                    raise FusionError(f"evaluate returned {type(results).__name__} of length "
                                      f"{len(results) if hasattr(results, '__len__') else '?'}, expected {len(run)}")
            except BaseException:
                for t in run:
                    try:
                        study.tell(t, state=TrialState.FAIL)
                    except Exception:  # noqa: BLE001
                        pass
                raise
            finally:
                if heartbeat is not None:
                    heartbeat.watch([])
            for t, res in zip(run, results):
                value, attrs = res
                for k, v in (attrs or {}).items():
                    t.set_user_attr(k, _jsonable(v))
                value = float(value)
                if math.isfinite(value):
                    study.tell(t, value)
                else:
                    study.tell(t, state=TrialState.FAIL)
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if bar is not None:
            bar.close()
    return study
