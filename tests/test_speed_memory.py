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
