"""Data you can filter: self-verification score, ratings, best-of-k, embeddings and perceptual hashes."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from janus.engine import CaptionEngine, SynthesisEngine
from janus.engine.prompts import RATING_LEVELS, SCORE_ANSWERS
from janus.engine.quality import CuratedSynthesis, QualityOptions, Reader, candidate_seed
from pipeline.images import phash

REPO = Path(__file__).resolve().parents[1]
RATE = "How would you rate the aesthetics of this image?"


@pytest.fixture(scope="module")
def reader(tiny_model, tiny_processor):
    return Reader(CaptionEngine(tiny_model, tiny_processor, max_batch_size=4))


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(n)]


def test_answer_words_are_looked_up_by_string(reader):
    tok = reader.tokenizer
    groups = reader.word_groups(SCORE_ANSWERS)
    for word, ids in zip(SCORE_ANSWERS, groups, strict=True):
        spellings = {tok.encode(s, add_special_tokens=False)[0] for s in (f" {word}", word, word.capitalize())}
        assert set(ids) <= spellings and ids  # first tokens of its spellings...
    assert not set(groups[0]) & set(groups[1])  # ...that the other word cannot start with
    assert len(reader.word_groups(RATING_LEVELS)) == 5


def test_score_is_p_yes_over_p_yes_plus_no_from_the_first_answer_token(reader, tiny_model):
    """Recomputed here from the model's own logits for the prompt the caption engine would build."""
    from janus.engine.prompts import SCORE_QUESTION

    images = _images(3)
    prompts = ["a red circle", "a blue square", "two cats"]
    scores = reader.scores(reader.features(images), prompts)
    engine = reader.engine
    yes, no = reader.word_groups(SCORE_ANSWERS)
    for image, prompt, score in zip(images, prompts, scores, strict=True):
        prepared = engine.prepare(0, {"image": image, "question": SCORE_QUESTION.format(prompt=prompt)})
        inputs = engine.processor.batchify([prepared.data])
        with torch.inference_mode():
            embeds = tiny_model.prepare_inputs_embeds(**inputs)
            hidden = tiny_model.language_model.model(inputs_embeds=embeds).last_hidden_state[:, -1]
            probs = torch.softmax(tiny_model.language_model.lm_head(hidden).float(), -1)[0]
        want = probs[yes].sum() / (probs[yes].sum() + probs[no].sum())
        assert score == pytest.approx(float(want), abs=1e-5)


def test_reading_is_the_same_alone_and_in_a_batch(reader):
    images = _images(5, seed=1)
    prompts = [f"prompt {i}" for i in range(5)]
    feats = reader.features(images)
    batch_scores = reader.scores(feats, prompts)
    batch_ratings = reader.ratings(feats, RATE)
    batch_embeddings = reader.embeddings(feats)
    for i in range(5):
        one = reader.features(images[i : i + 1])
        assert reader.scores(one, prompts[i : i + 1])[0] == pytest.approx(batch_scores[i], abs=1e-5)
        assert reader.ratings(one, RATE)[0] == pytest.approx(batch_ratings[i], abs=1e-4)
        assert np.allclose(reader.embeddings(one)[0], batch_embeddings[i], atol=2e-3)
    assert ((1 <= batch_ratings) & (batch_ratings <= 5)).all()
    norms = np.linalg.norm(batch_embeddings.astype(np.float32), axis=1)
    assert np.allclose(norms, 1, atol=2e-3) and batch_embeddings.dtype == np.float16
    assert len({e.tobytes() for e in batch_embeddings}) == 5  # different images, different embeddings


def test_ratings_renormalise_over_the_level_words(reader):
    feats = reader.features(_images(2, seed=2))
    probs = reader.answer_probabilities(feats, [RATE, RATE], RATING_LEVELS)
    assert probs.shape == (2, 5) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.allclose(reader.ratings(feats, RATE), probs @ np.array([5, 4, 3, 2, 1]), atol=1e-5)


def test_best_of_keeps_the_best_candidate_and_records_every_score(tiny_model, tiny_processor):
    synth = SynthesisEngine(tiny_model, tiny_processor, max_batch_size=8)
    curated = CuratedSynthesis(synth, QualityOptions(score=True, best_of=3))
    requests = [{"prompt": "a red circle on the left", "seed": 5}, {"prompt": "a cat", "seed": 9, "best_of": 2}]
    results = curated.generate(requests)
    assert [len(r.scores) for r in results] == [3, 2]
    for res in results:
        assert res.score == max(res.scores) and res.scores[res.candidate] == res.score
    # candidate j is the plain image of seed candidate_seed(seed, j): candidate 0 is the row's own seed
    j = results[0].candidate
    plain = synth.generate([{**requests[0], "seed": candidate_seed(5, j)}])[0]
    assert np.array_equal(plain.tokens, results[0].tokens)
    assert candidate_seed(5, 0) == 5 and len({candidate_seed(5, k) for k in range(8)}) == 8
    again = curated.generate(requests)
    assert [r.candidate for r in again] == [r.candidate for r in results]  # deterministic


def test_best_of_without_a_score_is_refused():
    with pytest.raises(ValueError, match="needs score"):
        QualityOptions(score=False, best_of=2)


def _jpeg(image: np.ndarray, quality: int = 85) -> np.ndarray:
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return np.asarray(PIL.Image.open(buf).convert("RGB"))


def _photo(seed: int) -> np.ndarray:
    """A smooth, photo-like test image (perceptual hashes are meant for such, not for noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    return np.asarray(PIL.Image.fromarray(small).resize((192, 192), PIL.Image.Resampling.BICUBIC))


def _bits(a: int, b: int) -> int:
    return bin((a ^ b) & (2**64 - 1)).count("1")


def test_phash_survives_reencoding_and_tells_images_apart():
    for seed in range(5):
        image = _photo(seed)
        assert _bits(phash(image), phash(_jpeg(image))) <= 4
        assert _bits(phash(image), phash(_photo(seed + 100))) > 12
    assert isinstance(phash(_photo(0)), int) and -(2**63) <= phash(_photo(0)) < 2**63


def test_distinct_counts_images_more_than_a_few_bits_apart():
    """A re-encoded copy is the same image; other images count, whatever their order."""
    from pipeline.images import distinct

    photos = [_photo(seed) for seed in range(4)]
    hashes = [phash(p) for p in photos] + [phash(_jpeg(p)) for p in photos]
    assert distinct(hashes) == 4 and distinct(hashes[::-1]) == 4
    assert distinct([phash(photos[0])] * 8) == 1 and distinct([]) == 0
    assert distinct([0, 0b11111, 0b1111]) == 2  # 5 bits from the first counts, 4 bits does not


def test_the_readme_query_finds_a_planted_near_duplicate(tmp_path):
    import duckdb

    from tests.support.rows import model_row, write_rows

    rows = []
    for i, image in enumerate([_photo(1), _photo(2), _jpeg(_photo(1)), _photo(3)]):
        rows.append(model_row(key=f"{i:020d}", status="ok", prompt="p", image=image, phash=phash(image)))
    write_rows(rows, str(tmp_path / "synthesis"))
    readme = (REPO / "README.md").read_text()
    query = re.search(r"-- near-duplicate pairs[^\n]*\n(SELECT .*?;)", readme, re.S).group(1)
    pairs = duckdb.sql(query.replace("out/synthesis", str(tmp_path / "synthesis"))).fetchall()
    assert [(a, b) for a, b, _ in pairs] == [(f"{0:020d}", f"{2:020d}")]


def test_scores_are_nan_free_and_in_range(reader):
    scores = reader.scores(reader.features(_images(4, seed=3)), ["x"] * 4)
    assert all(0 <= s <= 1 and not math.isnan(s) for s in scores)
