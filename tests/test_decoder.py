"""KVCacheDecoder: the grouped causal prefill equals the general masked path, cache included."""

from __future__ import annotations

import pytest
import torch

from janus.engine.decoder import KVCacheDecoder


def run(decoder: KVCacheDecoder, embeds, mask, *, masked: bool, steps: int = 3):
    b, t, _ = embeds.shape
    decoder.setup_caches(b, t + steps, dtype=embeds.dtype, device=embeds.device)
    if masked:  # the general path, forced (what prefill takes for masks that are not left padding)
        decoder.key_valid[:, :t] = mask.bool()
        hidden, positions = decoder._prefill_masked(embeds, mask.bool())
    else:
        hidden, positions = decoder.prefill(embeds, mask)
    outs = [hidden]
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(b, 1, embeds.shape[2], generator=gen)
        hidden = decoder.decode_step(x, positions, torch.tensor([t + step]), kv_len=t + step + 1)
        positions = positions + 1
        outs.append(hidden)
    valid = decoder.key_valid[:, :t].clone()
    keys = decoder.k_cache[:, :, :, :t].clone()
    decoder.release()
    return torch.stack(outs), positions, keys, valid


@pytest.mark.parametrize("lengths", [[7, 7, 7], [3, 9, 3, 9, 5], [1, 9, 9, 4]])
def test_grouped_prefill_equals_the_masked_path(tiny_model, lengths):
    decoder = KVCacheDecoder(tiny_model.language_model)
    t = max(lengths)
    embeds = torch.randn(len(lengths), t, tiny_model.language_model.config.hidden_size)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, t - n :] = 1  # left padding, rows of one length not next to each other
    with torch.inference_mode():
        fast = run(decoder, embeds, mask, masked=False)
        slow = run(decoder, embeds, mask, masked=True)
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(fast[1], slow[1]) and fast[1].tolist() == [n + 3 for n in lengths]
    assert torch.equal(fast[3], slow[3])
    # the keys of real tokens are the same; padded slots are never read
    real = fast[3][None, :, None, :, None].expand_as(fast[2])
    torch.testing.assert_close(fast[2][real], slow[2][real], rtol=1e-5, atol=1e-5)


def test_a_mask_with_holes_takes_the_masked_path(tiny_model):
    decoder = KVCacheDecoder(tiny_model.language_model)
    embeds = torch.randn(2, 6, tiny_model.language_model.config.hidden_size)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    with torch.inference_mode():
        fast = run(decoder, embeds, mask, masked=False)
        slow = run(decoder, embeds, mask, masked=True)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
