"""`medvl` command line: ingest | train | eval | transfer | compare | pipeline | tune | submit | jobs | embed.

    medvl ingest digits --out runs/corpora/digits
    medvl ingest csv data.tsv --out corpora/x --image-key filepath --text-key title
    medvl ingest folder images/ --out corpora/y --template "a photo of {}."
    medvl ingest pmc-oa pmc_oa.jsonl --images images.zip --out corpora/pmcoa   # also: roco, webdataset
    medvl train jobs/digits_clip.yaml [key.sub=value ...]
    medvl eval jobs/digits_clip.yaml [--checkpoint PATH]
    medvl transfer jobs/pmc_clip_digits.yaml --npz pneumoniamnist.npz   # MedMNIST probe + fine-tuning, AUC/ACC
    medvl compare jobs/a.yaml [jobs/b.yaml] [--a key=value ...] [--b key=value ...]   # same data, budget, seed
    medvl pipeline jobs/pipeline_digits_probe.yaml [stage.key=value ...] [--only S] [--force S] [--dry-run]
    medvl tune jobs/sweep_digits_lr_temp.yaml [key=value ...]
    medvl submit jobs/digits_clip.yaml --address http://127.0.0.1:8265
    medvl jobs status|logs|stop <job-id> --address ...
    medvl sync-metrics jobs/digits_clip.yaml        # after an MLflow outage: deliver buffered metrics, finish the run
    medvl embed jobs/digits_clip.yaml|runs:/<id>/model|OPEN_CLIP_DIR --images DIR --out OUT.parquet

Global flag: `medvl -v COMMAND ...` (or MEDVL_VERBOSE=1) also streams Ray's worker/driver logs and the INFO and
warning output of Ray, MLflow and open_clip to the console. Without it a training command shows its progress,
one line of held-out metrics per epoch and its summary; Ray's logs stay in files (the path is printed once,
`<run_root>/jobs/<run>/ray-logs`).
"""
from __future__ import annotations

import os
import sys

from medvl.redact import default_ray_auth_mode  # noqa: E402

os.environ["RAY_AUTH_MODE"] = default_ray_auth_mode()  # `token` when RAY_AUTH_TOKEN(_PATH) is set


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    while argv and argv[0] in ("-v", "--verbose"):
        os.environ["MEDVL_VERBOSE"] = "1"  # read by medvl.track.console.verbose() (also in Ray's processes)
        argv = argv[1:]
    from medvl.track.console import quiet_libraries
    quiet_libraries()  # no-op under -v
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    from medvl.config import ConfigError
    from medvl.data.corpus import CorpusError
    from medvl.redact import redact_text
    from medvl.track.runs import TrackingUnavailable
    from medvl.train.faults import TrainingAborted
    try:
        if cmd == "ingest":
            from medvl.data.ingest import main as run
        elif cmd == "train":
            from medvl.train.cli import train_main as run
        elif cmd == "eval":
            from medvl.train.cli import eval_main as run
        elif cmd == "transfer":
            from medvl.train.cli import transfer_main as run
        elif cmd == "compare":
            from medvl.train.compare import main as run
        elif cmd == "pipeline":
            from medvl.pipelines.cli import main as run
        elif cmd == "tune":
            from medvl.tune.cli import main as run
        elif cmd == "submit":
            from medvl.submit import submit_main as run
        elif cmd == "jobs":
            from medvl.submit import jobs_main as run
        elif cmd == "sync-metrics":
            from medvl.train.cli import sync_main as run
        elif cmd == "embed":
            from medvl.embed import main as run
        else:
            print(f"medvl: unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
            return 2
        return int(run(rest) or 0)
    except (ConfigError, CorpusError) as e:
        print(f"medvl {cmd}: error: {redact_text(e)}", file=sys.stderr)
        return 2
    except (TrainingAborted, TrackingUnavailable) as e:
        print(f"medvl {cmd}: error: {redact_text(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001
        if not _is_training_failure(e) or os.environ.get("MEDVL_VERBOSE", "") not in ("", "0"):
            raise  # anything else (and everything under -v): Python's own traceback
        # Ray Train's error carries each failed worker's traceback: that is what the user needs, not the
        # driver-side frames of fit() around it
        print(f"medvl {cmd}: error: the training failed in a Ray worker ({type(e).__name__}):\n{redact_text(e)}",
              file=sys.stderr)
        return 1


def entry() -> None:
    """The `medvl` console script (and `python -m medvl.cli`): `main()`, then `exit_now`."""
    exit_now(main())


def exit_now(code: int) -> None:
    """Exit with `code` as `sys.exit` would, without the interpreter's teardown of every module it imported: with
    torch, open_clip, Ray and MLflow loaded that teardown alone takes 1.3-2.3 s on a 2-core machine (measured after
    the last atexit handler), and a `medvl` command has nothing left to do by then. What an exit must still do runs
    first: stdout and stderr are flushed and every atexit handler runs (Ray's shutdown of an embedded cluster,
    MLflow's flush of asynchronous logging, `logging.shutdown`), then `os._exit`. With a non-daemon thread still
    running (`sys.exit` would wait for it), or `MEDVL_FULL_EXIT=1`, this is `sys.exit(code)`."""
    import atexit
    import threading
    busy = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if busy or os.environ.get("MEDVL_FULL_EXIT", "") not in ("", "0"):
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe: nothing more can be written anyway
            pass
    atexit._run_exitfuncs()  # noqa: SLF001 - what the interpreter would run next
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def _is_training_failure(e: BaseException) -> bool:
    """A Ray Train failure raised by `fit()` (a worker's exception, or the controller's)."""
    try:
        from ray.train import TrainingFailedError
    except ImportError:
        return False
    return isinstance(e, TrainingFailedError)


if __name__ == "__main__":
    entry()
