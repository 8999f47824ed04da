"""A gpt-fast style decoder over a transformers ``LlamaForCausalLM``'s own weights.

Why not ``generate``: both engines need many rows of different lengths in one batch, a KV cache
allocated once (so a 576-step image generation never reallocates), per-row masks and positions, and
a decode step with static shapes that ``torch.compile`` can turn into CUDA graphs. The layer math
(RMSNorm, rotary embedding, MLP) is transformers' own modules, so numerics match the reference.

Rows are left-padded, so every row writes the same cache slot at each step; a row's positions
count only its real tokens (``cumsum(mask) - 1``), exactly as transformers does with padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


class KVCacheDecoder:
    def __init__(self, language_model: torch.nn.Module):
        self.lm = language_model
        self.model = language_model.model
        cfg = language_model.config
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_position_embeddings = cfg.max_position_embeddings
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.key_valid: torch.Tensor | None = None

    # -- cache -----------------------------------------------------------------------------
    def cache_bytes(self, batch: int, max_len: int, dtype: torch.dtype) -> int:
        per = self.n_layers * batch * self.n_kv_heads * max_len * self.head_dim
        return 2 * per * torch.tensor([], dtype=dtype).element_size()

    def setup_caches(self, batch: int, max_len: int, *, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate (or reuse) the static cache for ``batch`` rows of up to ``max_len`` tokens."""
        shape = (self.n_layers, batch, self.n_kv_heads, max_len, self.head_dim)
        if self.k_cache is None or self.k_cache.shape != shape or self.k_cache.dtype != dtype:
            self.k_cache = self.v_cache = None  # free the old one before allocating
            self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
            self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        else:  # same buffers, same addresses (what CUDA graphs of a compiled step were recorded on)
            self.key_valid.zero_()

    def release(self) -> None:
        self.k_cache = self.v_cache = self.key_valid = None

    # -- forward -----------------------------------------------------------------------------
    def prefill(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the left-padded prompt; returns (last hidden state [B, D], next positions [B]).

        Rows of equal length run together as plain causal attention over their own tokens, the
        same computation as one unpadded prompt in the reference: no mask to build or read, the
        kernel skips the blocks above the diagonal, and padding costs nothing. Their keys and
        values land in the cache at the row's left-padded slots. A mask that is not left padding
        (holes) takes the general masked path.
        """
        t = embeds.shape[1]
        mask = attention_mask.bool()
        lengths = mask.sum(-1)
        suffix = torch.arange(t, device=mask.device)[None, :] >= (t - lengths)[:, None]
        self.key_valid[:, :t] = mask
        if not torch.equal(mask, suffix) or bool((lengths == 0).any()):
            return self._prefill_masked(embeds, mask)
        last = embeds.new_empty(embeds.shape[0], embeds.shape[2])
        for length in lengths.unique().tolist():
            rows = (lengths == length).nonzero().flatten()
            last[rows] = self._prefill_rows(embeds[rows, t - length :], rows, t - length)[:, -1]
        return last, lengths

    def _prefill_masked(self, embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The general path: the whole padded batch at once under its mask (``key_valid`` already set)."""
        t = embeds.shape[1]
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.forward(embeds, positions, torch.arange(t, device=embeds.device), kv_len=t)
        return hidden[:, -1], positions[:, -1] + 1

    def _prefill_rows(self, x: torch.Tensor, rows: torch.Tensor, start: int) -> torch.Tensor:
        """Unpadded prompts of one length for cache rows ``rows``, written at slots [start, start + L)."""
        b, t, _ = x.shape
        # rows sorted by length (the engines sort) are adjacent: a slice write; index_put otherwise,
        # measured ~50 ms slower per 8 x 620-token bf16 prefill on CPU
        contiguous = bool((rows == torch.arange(rows[0], rows[0] + b, device=rows.device)).all())
        first = int(rows[0])

        def attend(i, attn, q, k, v):
            if contiguous:
                self.k_cache[i, first : first + b, :, start : start + t] = k
                self.v_cache[i, first : first + b, :, start : start + t] = v
            else:
                self.k_cache[i, rows, :, start : start + t] = k.to(self.k_cache.dtype)
                self.v_cache[i, rows, :, start : start + t] = v.to(self.v_cache.dtype)
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=self.n_kv_heads != self.n_heads
            )

        return self._layers(x, torch.arange(t, device=x.device).expand(b, t), attend)

    # -- per-row lengths (continuous batching: rows start at different times) ---------------------
    def prefill_slots(self, embeds: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Unpadded prompts of one length into empty cache rows ``rows`` (their keys at [0, L));
        returns the last hidden state of each [n, D]. Other rows' caches are untouched."""
        t = embeds.shape[1]
        self.key_valid[rows] = False
        self.key_valid[rows, :t] = True
        return self._prefill_rows(embeds, rows, 0)[:, -1]

    def decode_window(
        self, embeds: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, kv_len: int
    ) -> torch.Tensor:
        """W tokens for each of the first B cache rows in one forward pass (``embeds`` [B, W, D]): row b's
        window is written at cache slots ``slots[b] .. slots[b] + W - 1`` with rotary positions from
        ``positions[b]``, each token attending to its row's filled prefix and to the window's tokens
        before it (causal within the window); returns hidden [B, W, D].

        Rows keep their own lengths, so a request can join or leave at any step (``scheduler.py``),
        and a multi-token method (``speculative.py``) can verify W drafted tokens per pass, then keep
        each row's accepted part with ``rollback``. B may be less than the cache's rows: requests sit
        in the lowest rows and the empty ones are left out. ``kv_len`` must cover every window."""
        b, w = embeds.shape[:2]
        dev = embeds.device
        rows = torch.arange(b, device=dev)[:, None]
        at = slots[:, None] + torch.arange(w, device=dev)[None, :]  # [B, W] each token's cache slot
        self.key_valid[rows, at] = True
        keys = torch.arange(kv_len, device=dev)
        # a query sees its row's valid keys up to its own slot (rolled-back slots are invalid)
        mask = (self.key_valid[:b, None, :kv_len] & (keys[None, None, :] <= at[:, :, None]))[:, None]

        def attend(i, attn, q, k, v):
            self.k_cache[i][rows, :, at] = k.transpose(1, 2).to(self.k_cache.dtype)
            self.v_cache[i][rows, :, at] = v.transpose(1, 2).to(self.v_cache.dtype)
            return F.scaled_dot_product_attention(
                q,
                self.k_cache[i][:b, :, :kv_len],
                self.v_cache[i][:b, :, :kv_len],
                attn_mask=mask,
                scale=attn.scaling,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )

        return self._layers(embeds, positions[:, None] + torch.arange(w, device=dev)[None, :], attend)

    def decode_slots(
        self, embeds: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, kv_len: int
    ) -> torch.Tensor:
        """One token for each of the first B cache rows (``embeds`` [B, 1, D]) at its own slot: the
        one-token window; returns hidden [B, D]."""
        return self.decode_window(embeds, positions, slots, kv_len)[:, -1]

    def rollback(self, rows: torch.Tensor, lengths: torch.Tensor) -> None:
        """Forget cache row ``rows[i]``'s slots from ``lengths[i]`` on (a rejected draft's keys): they
        are never attended again and the next window overwrites them."""
        keep = torch.arange(self.key_valid.shape[1], device=rows.device)[None, :] < lengths[:, None]
        self.key_valid[rows] &= keep

    def decode_step(
        self, embeds: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor, kv_len: int | None = None
    ) -> torch.Tensor:
        """One token per row at cache ``slot`` (a 1-element tensor); returns hidden [B, D].

        ``kv_len`` None attends over the whole static cache (fixed shapes, for torch.compile);
        an int attends over the filled prefix only (faster in eager mode, same result).
        """
        self.key_valid.index_fill_(1, slot, True)
        return self.forward(embeds, positions[:, None], slot, kv_len=kv_len)[:, -1]

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, kv_len: int | None
    ) -> torch.Tensor:
        kv_len = kv_len or self.k_cache.shape[3]
        key_pos = torch.arange(kv_len, device=x.device)
        causal = key_pos[None, :] <= slots[:, None]  # [t, kv]
        mask = self.key_valid[:, None, :kv_len] & causal[None]  # [b, t, kv]
        mask = mask | (key_pos[None, None, :] == slots[None, :, None])  # a padded query still sees itself
        mask = mask[:, None]  # [b, 1, t, kv]

        def attend(i, attn, q, k, v):
            self.k_cache[i].index_copy_(2, slots, k.to(self.k_cache.dtype))
            self.v_cache[i].index_copy_(2, slots, v.to(self.v_cache.dtype))
            keys = self.k_cache[i][:, :, :kv_len]
            values = self.v_cache[i][:, :, :kv_len]
            return F.scaled_dot_product_attention(
                q,
                keys,
                values,
                attn_mask=mask,
                scale=attn.scaling,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )

        return self._layers(x, positions, attend)

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """The decoder layers, transformers' own modules, around ``attend(layer index, attention module,
        q, k, v) -> output``, which writes the cache and attends the way its caller needs."""
        b, t, _ = x.shape
        cos, sin = self.model.rotary_emb(x, positions)
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            o = attend(i, attn, q, k, v)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(b, t, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.lm_head(hidden)
