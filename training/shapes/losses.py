"""Stage 2's losses: next-code prediction (plain, or on CFG's guided logits) and next-token prediction
of understanding's answers, on the batches ``batches.Batches`` builds."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def generation_logits(model, ids, mask, codes) -> torch.Tensor:
    """Teacher-forced image-code logits [B, codes, V]: left-padded prompt + codes[:-1] in (through gen_head)."""
    lm = model.language_model
    embeds = torch.cat([lm.get_input_embeddings()(ids), model.prepare_gen_img_embeds(codes[:, :-1])], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(codes[:, :-1])], dim=1)
    hidden = lm.model(
        inputs_embeds=embeds, attention_mask=full_mask, position_ids=_positions(full_mask)
    ).last_hidden_state
    return model.gen_head(hidden[:, ids.shape[1] - 1 :]).float()


def code_weights(
    codes: torch.Tensor,
    shape_weight: float = 1.0,
    telling: torch.Tensor | None = None,
    telling_weight: float = 1.0,
) -> torch.Tensor | None:
    """Per-code loss weights [B, codes], or None for a plain mean: 1 for an image's background code (its
    most frequent one), ``shape_weight`` for every other code (the shape, its edges, and the first code
    of the shape, where the image's position is decided), and ``telling_weight`` for the codes in
    ``telling`` (bool [B, codes], ``Pool.shape_telling``: the cells that would change were the scene's
    shape another). The background is ~88% of the codes and the easiest to predict; colour and position
    show in every shape code, the shape only in its few telling ones (weighting those drew no better:
    docs/shapes_model.md, "Ablations worth keeping")."""
    if shape_weight == 1.0 and (telling is None or telling_weight == 1.0):
        return None
    background = codes.mode(dim=1).values[:, None]
    weights = torch.where(codes == background, 1.0, shape_weight)
    return weights if telling is None else torch.where(telling, telling_weight, weights)


def code_loss(logits: torch.Tensor, codes: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of image-code logits [B, codes, V] against ``codes``, weighted by ``code_weights``."""
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1), reduction="none")
    if weights is None:
        return flat.mean()
    return (flat * weights.reshape(-1)).sum() / weights.sum()


def generation_loss(model, ids, mask, codes, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher-forced next-code prediction: prompt + codes[:-1] in, codes out."""
    return code_loss(generation_logits(model, ids, mask, codes), codes, weights)


def guided_generation_loss(
    model, ids, mask, codes, scale: float, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """On ``Batches.generation_pairs``: (next-code loss of both branches, next-code loss of the logits
    CFG samples from at ``scale``: uncond + scale * (cond - uncond), DeepSeek's formula on raw logits);
    ``weights`` are the first half's (each scene's), used for both branches.

    Why: with raw-logit CFG a code that both branches rate very low but the unconditional one lower
    still gets its gap multiplied by ``scale`` and can win; the 4-layer model, trained on each branch
    alone, drew worse the stronger the guidance (all-correct 0.14 at cfg 1, 0.0 at cfg 5). Training
    the guided logits themselves teaches both branches to keep CFG's extrapolation on the right code.
    Sampling is unchanged: the engines apply the same formula to the same two branches."""
    logits = generation_logits(model, ids, mask, codes)
    n = ids.shape[0] // 2
    guided = logits[n:] + scale * (logits[:n] - logits[n:])
    both = None if weights is None else torch.cat([weights, weights])
    return code_loss(logits, codes, both), code_loss(guided, codes[:n], weights)


def understanding_loss(model, ids, mask, labels, pixels, image_pos) -> torch.Tensor:
    """Next-token loss of the answers (``labels``), the image's SigLIP features in its tokens' places."""
    lm = model.language_model
    embeds = lm.get_input_embeddings()(ids)
    feats = model.aligner(model.vision_model(pixels))  # [B, 36, D]
    embeds = embeds.clone()
    embeds[image_pos] = feats.reshape(-1, feats.shape[-1]).to(embeds.dtype)
    hidden = lm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    logits = lm.lm_head(hidden[:, :-1]).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
