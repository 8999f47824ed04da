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


def _prefilled(model, lengths: list[int], extra: int):
    """A decoder with left-padded random prompts of ``lengths`` prefilled; (decoder, positions, slot)."""
    decoder = KVCacheDecoder(model.language_model)
    t, d = max(lengths), model.language_model.config.hidden_size
    gen = torch.Generator().manual_seed(3)
    embeds = torch.randn(len(lengths), t, d, generator=gen)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, t - n :] = 1
    decoder.setup_caches(len(lengths), t + extra, dtype=torch.float32, device=torch.device("cpu"))
    _, positions = decoder.prefill(embeds, mask)
    return decoder, positions, torch.full((len(lengths),), t)


def _greedy(decoder, model, positions, slots, steps: int) -> tuple[list[list[int]], torch.Tensor]:
    """``steps`` greedy tokens after token 7, one token per step: (each row's tokens, hidden [B, steps, D])."""
    embed = model.language_model.get_input_embeddings()
    tokens = [[7] for _ in range(len(positions))]
    hidden = []
    for step in range(steps):
        feed = torch.tensor([row[-1:] for row in tokens])
        out = decoder.decode_window(embed(feed), positions + step, slots + step, int(slots.max()) + step + 1)
        hidden.append(out[:, 0])
        for row, tok in zip(tokens, decoder.logits(out[:, 0]).argmax(-1).tolist(), strict=True):
            row.append(tok)
    return tokens, torch.stack(hidden, 1)


@pytest.mark.parametrize("window", [2, 5])
def test_a_window_equals_one_token_steps(tiny_model, window):
    """A W-token window (causal within it, each row at its own length) computes what W one-token steps
    compute: hidden states equal to fp32 rounding (the kernels sum in another order for W rows at
    once, ~1e-7) and the same greedy tokens; its keys land in the same slots."""
    lengths, steps = [4, 9, 6], 11
    with torch.inference_mode():
        dec1, pos, slots = _prefilled(tiny_model, lengths, steps + window)
        ref_tokens, ref_hidden = _greedy(dec1, tiny_model, pos, slots, steps)
        decw, pos, slots = _prefilled(tiny_model, lengths, steps + window)
        embed = tiny_model.language_model.get_input_embeddings()
        hidden = []
        for start in range(0, steps, window):  # feed the reference tokens a window at a time
            w = min(window, steps - start)
            feed = torch.tensor([row[start : start + w] for row in ref_tokens])
            out = decw.decode_window(embed(feed), pos + start, slots + start, int(slots.max()) + start + w)
            hidden.append(out)
        hidden = torch.cat(hidden, 1)
        chosen = decw.logits(hidden).argmax(-1).tolist()
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-5, atol=1e-5)
    assert chosen == [row[1 : steps + 1] for row in ref_tokens]
    t = max(lengths)
    valid = dec1.key_valid[:, : t + steps]
    assert torch.equal(decw.key_valid[:, : t + steps], valid)
    torch.testing.assert_close(decw.k_cache[:, :, :, t : t + steps], dec1.k_cache[:, :, :, t : t + steps])


def test_rollback_forgets_a_rows_rejected_window(tiny_model):
    """Rolled-back slots are never attended: decoding on from a row's kept length gives what decoding
    without the rejected tokens gives, and other rows keep their windows."""
    embed = tiny_model.language_model.get_input_embeddings()
    with torch.inference_mode():
        dec, pos, slots = _prefilled(tiny_model, [5, 5], 8)
        kv = int(slots.max())
        dec.decode_window(embed(torch.tensor([[3, 4, 5], [3, 4, 5]])), pos, slots, kv + 3)
        dec.rollback(torch.tensor([0]), slots[:1] + 1)  # row 0 keeps token 3 only
        assert dec.key_valid[0, kv + 1 :].sum() == 0 and dec.key_valid[1, kv : kv + 3].all()
        after = dec.decode_window(embed(torch.tensor([[9], [9]])), pos + torch.tensor([1, 3]),
                                  slots + torch.tensor([1, 3]), kv + 4)[:, 0]
        ref, pos2, slots2 = _prefilled(tiny_model, [5, 5], 8)
        expected = ref.decode_window(embed(torch.tensor([[3, 9], [3, 9]])), pos2, slots2, kv + 2)[0, 1]
    torch.testing.assert_close(after[0], expected, rtol=1e-5, atol=1e-5)
