"""ShardedSafetensorsWriter spills every tensor to disk at once; the shards it writes are ordinary
safetensors files (read back exactly, by safetensors itself), split at max_shard_bytes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from moesvd_vllm.format.safetensors_io import INDEX_FILE, ShardedSafetensorsWriter
from offline.expert_tensors import CheckpointTensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),  # odd byte count before float32 data
        "b.f32": torch.randn(7, generator=g),
        "c.f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "d.i64": torch.arange(5),
        "e.view": torch.randn(8, 4, generator=g)[2:5],  # a view of a larger tensor: only its bytes
        "f.empty": torch.zeros(0, 3),
        "g.scalar": torch.tensor(1.5),
    }


@pytest.mark.parametrize("max_shard_bytes", [2**30, 64])
def test_written_shards_read_back_exactly(tmp_path, max_shard_bytes):
    tensors = _tensors()
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=max_shard_bytes)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    shards = writer.finish()
    assert (len(shards) == 1) == (max_shard_bytes == 2**30)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([INDEX_FILE] + [p.name for p in shards])
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    read = CheckpointTensors(tmp_path)
    for name, tensor in tensors.items():
        got = read.get(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
    for shard in shards:  # safetensors' own reader, metadata included
        with safe_open(shard, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}


def test_a_name_written_twice_is_refused(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path)
    writer.add("x", torch.zeros(2))
    with pytest.raises(ValueError, match="written twice"):
        writer.add("x", torch.ones(2))
