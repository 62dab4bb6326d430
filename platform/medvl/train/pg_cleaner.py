"""Ray Train V2's placement-group cleaner, asking the GCS instead of the dashboard's State API.

Why: every TorchTrainer starts a detached `PlacementGroupCleaner` actor that polls, once a second, whether the run's
TrainController is still alive, and removes the worker placement group when it is not (a controller killed from
outside, as Tune kills the trial of a stopped sweep trial, would otherwise leak its workers' CPUs until the sweep
starves). Ray 2.60 asks `ray.util.state.get_actor` (ray/train/v2/_internal/state/util.py:is_actor_alive), which is
served by the dashboard. Without the dashboard every poll fails and logs "Failed to query Ray Train Controller
actor state" (147 lines in one demo run) and a dead controller is never noticed; with the dashboard its processes
cost a 2-core machine ~2% and training samples/s.

The GCS itself knows every actor's state (`ray._private.state.actors(id)`, the table `ray list actors` reads),
dashboard or not. `MedvlTorchTrainer` is a TorchTrainer whose default callbacks use `GcsPlacementGroupCleaner`,
whose monitor loop answers "is the controller alive?" from the GCS. The patch is applied inside the cleaner
actor's own process (a dedicated Ray worker), to the one module-level function its loop calls; nothing else in
Ray changes. With it, single jobs and sweeps both run without the dashboard, without the warning spam, and
without leaks (tests/test_tune.py::test_stopped_trials_release_their_train_workers runs a sweep without the
dashboard and checks that every stopped trial's placement group is removed).

If a later Ray moves these internals, `MedvlTorchTrainer` falls back to Ray's own cleaner (and says so once).
"""
from __future__ import annotations

import logging

from ray.train.torch import TorchTrainer

log = logging.getLogger(__name__)


def gcs_actor_alive(actor_id: str, timeout: float = 0) -> bool:
    """Whether the actor is alive, from the GCS actor table (no dashboard needed). An actor the GCS does not know
    (empty record) counts as dead, as in Ray's own `is_actor_alive`."""
    import ray._private.state
    from ray.util.state.exception import RayStateApiException
    try:
        info = ray._private.state.actors(actor_id=actor_id)
    except Exception as e:  # noqa: BLE001 - the cleaner's loop treats this as "unknown, ask again"
        raise RayStateApiException(f"GCS actor table unavailable: {e}") from e
    return bool(info) and info.get("State") != "DEAD"


try:
    from ray.train.v2._internal.callbacks import DatasetsCallback
except ImportError:  # another Ray: its callbacks as they are
    DatasetsCallback = None

try:
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.controller import placement_group_cleaner as _cleaner_mod
    from ray.train.v2._internal.execution.controller.placement_group_cleaner import PlacementGroupCleaner

    class GcsPlacementGroupCleaner(PlacementGroupCleaner):
        """Ray's cleaner; its liveness check reads the GCS actor table (this actor's process only)."""

        def _monitor_loop(self):
            _cleaner_mod.is_actor_alive = gcs_actor_alive
            return super()._monitor_loop()

    class GcsPlacementGroupCleanerCallback(PlacementGroupCleanerCallback):
        """Ray's callback, launching `GcsPlacementGroupCleaner` instead of Ray's cleaner (runs in the controller)."""

        def after_controller_start(self, train_run_context):
            from ray.train.v2._internal.callbacks import placement_group_callback as m
            original = m.PlacementGroupCleaner
            m.PlacementGroupCleaner = GcsPlacementGroupCleaner
            try:
                return super().after_controller_start(train_run_context)
            finally:
                m.PlacementGroupCleaner = original

    _AVAILABLE = True
except ImportError:  # another Ray: keep its own cleaner
    _AVAILABLE = False


class MedvlTorchTrainer(TorchTrainer):
    """TorchTrainer with `GcsPlacementGroupCleanerCallback` in place of Ray's placement-group cleaner callback.

    No cleaner at all when `fit()` runs in the very process that started an embedded Ray (`medvl train`, a
    pipeline's train stage, `medvl compare`): nothing else can kill that run's controller, and when this process
    ends, the embedded cluster and its placement groups end with it. The cleaner is a detached actor, one more
    Python process per job. Sweep trials (their `fit()` runs in a Tune actor) and jobs on a cluster keep it."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if not self.datasets and DatasetsCallback is not None:
            # medvl passes no `datasets=` (each rank streams its own plan), but Ray's DatasetsCallback starts a
            # DatasetManager actor for every worker group anyway: one more Python process per job and trial
            # (about 1.5 CPU-s of imports while the workers start) that serves no dataset. Its other duty,
            # copying the driver's DataContext to the workers, medvl's worker does itself (medvl.train.worker).
            callbacks = [c for c in callbacks if type(c) is not DatasetsCallback]
        if not _AVAILABLE:
            log.warning("medvl: this Ray has no PlacementGroupCleanerCallback where Ray 2.60 has it; using Ray's "
                        "own placement-group cleaner")
            return callbacks
        from medvl.train.faults import started_here
        if started_here():
            return [c for c in callbacks if type(c) is not PlacementGroupCleanerCallback]
        return [GcsPlacementGroupCleanerCallback() if type(c) is PlacementGroupCleanerCallback else c
                for c in callbacks]


__all__ = ["MedvlTorchTrainer", "gcs_actor_alive"]
