"""A corpus several times larger than Ray's object store streams through decode + augment with bounded
memory: every row arrives, nothing like the whole corpus is spilled, the driver's memory stays flat."""
import io
import re
import resource

import numpy as np
import pytest
from PIL import Image

from medvl.config import DataConfig, ModelConfig
from medvl.data.corpus import Manifest, ShardWriter, write_manifest

OBJECT_STORE = 100 * 1024**2


def _noise_png(rng, size=512):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG",
                                                                                 compress_level=0)
    return buf.getvalue()


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    w = ShardWriter(out, shard_size=50)
    total = 0
    for i in range(500):  # ~790 KB of incompressible pixels per row -> ~390 MB, ~4x the object store
        img = _noise_png(rng)
        total += len(img)
        w.add({"sample_id": f"n{i}", "image": img, "texts": [f"noise sample {i % 10}"], "split": "train",
               "labels": {"k": float(i % 10)}})
    write_manifest(out, Manifest(source="noise", shards=w.close()))
    return str(out), total


def _spilled_mib() -> float:
    import ray
    from ray._private.internal_api import memory_summary
    # this cluster's address: with another Ray instance on the machine, auto-detection refuses to choose
    m = re.search(r"Spilled ([\d.]+) MiB",
                  memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True))
    return float(m.group(1)) if m else 0.0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_corpus_larger_than_object_store_streams(big_corpus):
    import ray
    from medvl.data.stream import build_dataset
    corpus, nbytes = big_corpus
    assert nbytes > 3.5 * OBJECT_STORE
    if ray.is_initialized():
        ray.shutdown()
    from medvl.raynode import init_local
    init_local(num_cpus=4, object_store_memory=OBJECT_STORE, include_dashboard=False)
    try:
        from dataclasses import asdict

        from medvl.methods.clip import ClipDecoder
        ds = build_dataset(DataConfig(corpus=corpus, decode_batch_size=16),
                           ClipDecoder(asdict(ModelConfig(name="test-vit-micro")), train=True), "train",
                           epochs=range(2))
        batches = iter(ds.iter_torch_batches(batch_size=32))
        rows = len(next(batches)["image"])  # first batch: imports torch in the driver, starts the pipeline
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for batch in batches:
            assert batch["image"].shape[1:] == (3, 32, 32)
            rows += len(batch["image"])
        rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
        spilled = _spilled_mib()
    finally:
        ray.shutdown()
    assert rows == 2 * 500
    # streaming: the 2 x 390 MB pass never had to be parked in (or spilled from) the 100 MB store
    assert spilled < 0.25 * nbytes / 1024**2, f"spilled {spilled} MiB"
    assert rss_growth < 300, f"driver RSS grew by {rss_growth:.0f} MiB"
    print(f"streamed {2 * nbytes / 1024**2:.0f} MiB through a {OBJECT_STORE / 1024**2:.0f} MiB object store; "
          f"spilled {spilled:.0f} MiB; driver peak RSS growth {rss_growth:.0f} MiB")


@pytest.mark.timeout(300)
def test_ray_datas_helper_actors_started_ahead_are_the_ones_the_stream_uses(digits_corpus):
    """The trainer's driver starts Ray Data's per-cluster helper actors before the worker group
    (`medvl.data.stream.start_ray_data_actors`, called by `build_trainer`), so that a rank's first stream does not
    wait for their processes. Checked on a fresh Ray: they exist right after the call, and the stream then uses
    them (still one of each, the same actors). Fails if Ray moves or renames the getters (the optimisation would
    then be lost silently)."""
    import ray
    from dataclasses import asdict

    from medvl.data.stream import build_dataset, start_ray_data_actors
    from medvl.methods.clip import ClipDecoder
    from medvl.raynode import init_local
    if ray.is_initialized():
        ray.shutdown()
    init_local(num_cpus=4, include_dashboard=False, logging_level="WARNING")

    def helpers():
        return {a["name"]: a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"] in ("datasets_stats_actor", "AutoscalingCoordinator")}

    try:
        assert helpers() == {}
        start_ray_data_actors()
        ahead = {n: ray.get_actor(n, namespace=a["namespace"])._actor_id.hex() for n, a in helpers().items()}
        assert set(ahead) == {"datasets_stats_actor", "AutoscalingCoordinator"}, ahead
        ds = build_dataset(DataConfig(corpus=digits_corpus, decode_batch_size=64),
                           ClipDecoder(asdict(ModelConfig(name="test-vit-micro")), train=True), "train")
        assert sum(len(b["image"]) for b in ds.iter_batches(batch_size=None)) > 1000
        after = {n: ray.get_actor(n, namespace=a["namespace"])._actor_id.hex() for n, a in helpers().items()}
        assert after == ahead
        import ray._private.state
        classes = [a["ActorClassName"] for a in ray._private.state.actors().values()]
        assert classes.count("_StatsActor") == 1 and classes.count("_AutoscalingCoordinatorActor") == 1, classes
    finally:
        ray.shutdown()
