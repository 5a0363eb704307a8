"""Memory of a long propagation: the embedding LRU is small when a disk cache backs it."""

from __future__ import annotations

import numpy as np

from medseg.volume import Volume


def test_memory_lru_default_depends_on_disk_cache(tmp_path) -> None:
    from medseg.models.sam import get_sam_model
    from medseg.predict.sam import VolumePredictor

    vol = Volume(np.zeros((3, 32, 32), np.float32), spacing=(1.0, 1.0, 1.0))
    model = get_sam_model("litemedsam", precision="auto")
    on_disk = VolumePredictor(vol, model, cache_dir=tmp_path)
    in_memory = VolumePredictor(vol, model)
    explicit = VolumePredictor(vol, model, cache_dir=tmp_path, memory_slices=5)
    assert on_disk.cache_info()["memory_limit_items"] == 64  # 256 MiB of embeddings
    assert in_memory.cache_info()["memory_limit_items"] == 256
    assert explicit.cache_info()["memory_limit_items"] == 5
    # an evicted slice comes back from disk, not from the encoder
    small = VolumePredictor(vol, model, cache_dir=tmp_path, memory_slices=1)
    a = small.embed(0).clone()
    small.embed(1)
    b = small.embed(0)
    assert small.encoder_calls == 2 and small.cache_info()["disk_hits"] == 1
    assert np.array_equal(a.numpy(), b.numpy())


def test_labels_info_counts_in_chunks_equal_unique(monkeypatch) -> None:
    from medseg import report
    from medseg.volume import LabelMap

    rng = np.random.default_rng(0)
    arr = rng.choice([0, 1, 2, 7], size=(5, 30, 40), p=[0.7, 0.2, 0.09, 0.01]).astype(np.uint8)
    arr[0, 0, :3] = 9  # a value only in the first chunk, not in the table
    lm = LabelMap(arr, spacing=(2.0, 0.5, 0.5), labels={1: "a", 2: "b", 5: "absent", 7: "c"})
    monkeypatch.setattr(report, "_COUNT_CHUNK", 1000)  # 6 chunks, the last one partial
    got = report.labels_info(lm)
    vals, counts = np.unique(arr, return_counts=True)
    want = {int(v): int(n) for v, n in zip(vals, counts, strict=True) if v != 0}
    assert [e["value"] for e in got] == [1, 2, 5, 7, 9]
    for e in got:
        assert e["voxels"] == want.get(e["value"], 0)
        assert e["volume_mm3"] == e["voxels"] * 0.5
    assert got[2]["name"] == "absent" and got[2]["voxels"] == 0
