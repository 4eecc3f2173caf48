"""The padding kernel's CPU version (hjcg.torch.ops.hjcg.pad_prompt): one chunk into a prefill graph's inputs."""
import pytest
import torch

import hjcg.native  # noqa: F401  (registers torch.ops.hjcg)


def buffers(bucket: int):
    return (torch.full((bucket,), -7, dtype=torch.int64), torch.full((bucket,), -7, dtype=torch.int64),
            torch.full((1,), -7, dtype=torch.int64), torch.full((1,), -7, dtype=torch.int64))


@pytest.mark.parametrize("length,bucket,start", [(1, 1, 0), (5, 16, 0), (16, 16, 0), (7, 32, 100)])
def test_writes_ids_pads_positions_last_index_and_length(length, bucket, start):
    prompt = torch.randint(0, 1000, (length,))
    ids, pos, last, seq_len = buffers(bucket)
    torch.ops.hjcg.pad_prompt(prompt, start, 2, ids, pos, last, seq_len)
    assert torch.equal(ids[:length], prompt)
    assert bool((ids[length:] == 2).all())
    assert torch.equal(pos, torch.arange(start, start + bucket))
    assert int(last) == length - 1 and int(seq_len) == start + length


def test_rejects_a_chunk_longer_than_the_bucket_and_empty_chunks():
    ids, pos, last, seq_len = buffers(4)
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.hjcg.pad_prompt(torch.arange(5), 0, 0, ids, pos, last, seq_len)
    with pytest.raises(RuntimeError, match="at least one token"):
        torch.ops.hjcg.pad_prompt(torch.arange(0), 0, 0, ids, pos, last, seq_len)
