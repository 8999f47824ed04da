"""The shapes model's trainer (``training.shapes``): its examples are the engines' token layout, its flags
do what they say, it resumes, and it never trains on a held-out combination."""

from __future__ import annotations

import random

import numpy as np
import pytest

from janus.shapes import HELD_OUT, Scene, caption, draw, judge
from janus.shapes.data import ATTRIBUTES, all_scenes, random_scene
from training.shapes import examples
from training.shapes.batches import CFG_DROPOUT, Batches, Pool
from training.shapes.cli import main
from training.shapes.losses import code_loss, code_weights, generation_loss, guided_generation_loss
from training.shapes.model import build_model, to_unit, tokenizer_corpus, vq_params, write_skeleton
from training.shapes.state import lr_at
from training.shapes.vq import train_vq, uniform_cells, uniform_code_loss, vq_codes, vq_roundtrip_accuracy


def test_held_out_combinations_are_never_trained_on():
    """Training draws, perturbs and tokenises only in-distribution scenes (composition, not memory)."""
    rng = np.random.default_rng(0)
    assert not any(random_scene(rng).held_out for _ in range(5000))
    assert all(random_scene(rng, held_out=True).held_out for _ in range(50))
    r = random.Random(0)
    scenes = all_scenes(held_out=False)
    assert not any(examples.perturbed(scenes[r.randrange(len(scenes))], r).held_out for _ in range(5000))
    corpus = " ".join(tokenizer_corpus())
    for color, shape in HELD_OUT:
        assert f"{color} {shape}" not in corpus


def _one_scene_pool(scene: Scene):
    """A training pool of one drawn scene (what ``Batches`` reads: scenes, images, codes)."""
    import torch

    fields = {
        "scenes": [scene],
        "images": np.stack([draw(scene)]),
        "codes": torch.zeros(1, 576, dtype=torch.long),
    }
    return type("OnePool", (), fields)


@pytest.fixture(scope="module")
def skeleton_processor(tmp_path_factory):
    """The processor of a shapes skeleton (tokenizer and image processor, no weights), made once."""
    from janus.models import VLChatProcessor

    skeleton = tmp_path_factory.mktemp("shapes") / "skeleton"
    write_skeleton(skeleton)
    return VLChatProcessor.from_pretrained(skeleton)


def test_training_sequences_are_the_engines_prompts(tmp_path):
    """The shapes model learns on exactly the token layout the engines use at run time."""
    import torch

    from janus.engine import CaptionEngine, SynthesisEngine
    from janus.engine.prompts import DEFAULT_QUESTION, t2i_prompt_ids, unconditional_ids
    from janus.models import VLChatProcessor

    skeleton = tmp_path / "skeleton"
    cfg = write_skeleton(skeleton)
    processor = VLChatProcessor.from_pretrained(skeleton)
    model = build_model(cfg)
    scene = Scene("red", "circle", "left", "blue")

    batches = Batches(processor, _one_scene_pool(scene))
    rng = random.Random(1)
    assert rng.random() >= CFG_DROPOUT  # this seed keeps the prompt (no CFG dropout)
    ids, mask, _ = batches.generation([0], random.Random(1))
    assert ids[0].tolist() == SynthesisEngine(model, processor).prompt_ids(caption(scene))
    assert ids[0].tolist() == t2i_prompt_ids(processor, caption(scene))

    # the guided loss's pairs are the engine's two CFG branches, and at scale 1 it is the conditional loss
    other = Scene("black", "square", "center", "white")
    batches.pool = type(
        "TwoPool", (), {"scenes": [scene, other], "codes": torch.arange(2 * 576).view(2, 576) % 64}
    )
    ids, mask, codes = batches.generation_pairs([0, 1])
    engine = SynthesisEngine(model, processor)
    for row, s in enumerate((scene, other)):
        cond = engine.prompt_ids(caption(s))
        assert ids[row][mask[row].bool()].tolist() == cond
        assert ids[2 + row][mask[2 + row].bool()].tolist() == unconditional_ids(cond, processor.pad_id)
    torch.manual_seed(0)
    _, at_one = guided_generation_loss(model, ids, mask, codes, 1.0)
    assert at_one.item() == pytest.approx(
        generation_loss(model, ids[:2], mask[:2], codes[:2]).item(), rel=1e-5
    )

    # --shape-weight: an image's most frequent code (its background) weighs 1, every other code w; a
    # model that misses only the shape's codes loses more with w > 1, and w = 1 is the plain mean
    codes = torch.tensor([[5, 5, 7, 5], [2, 9, 9, 9]])
    assert code_weights(codes, 4.0).tolist() == [[1, 1, 4, 1], [4, 1, 1, 1]]
    assert code_weights(codes, 1.0) is None  # the plain mean
    # --telling-weight: the shape-telling cells weigh their own, background or not
    telling = torch.tensor([[False, True, True, False], [False, False, False, True]])
    assert code_weights(codes, 4.0, telling, 8.0).tolist() == [[1, 8, 8, 1], [4, 1, 1, 8]]
    logits = torch.nn.functional.one_hot(codes, 16).float() * 10
    logits[0, 2] = 0.0  # unsure only where the shape is
    plain = code_loss(logits, codes)
    assert plain.item() == pytest.approx(code_loss(logits, codes, None).item())
    assert code_loss(logits, codes, code_weights(codes, 4.0)).item() > 2 * plain.item()

    prompt_ids, answer_ids = batches.understanding_ids(DEFAULT_QUESTION, caption(scene))
    prepared = CaptionEngine(model, processor).prepare(
        0, {"image": draw(scene), "question": DEFAULT_QUESTION}
    )
    assert prompt_ids == prepared.data.input_ids.tolist()
    assert processor.tokenizer.decode(answer_ids, skip_special_tokens=True) == " " + caption(scene)


def test_yes_no_negatives_and_attribute_questions_are_what_the_flags_ask(skeleton_processor):
    """--negative-attributes: a one-change negative changes only those attributes; --attribute-questions:
    a row asks one attribute alone and its answer is that attribute in the caption's words."""
    from janus.engine.prompts import SCORE_QUESTION

    r = random.Random(0)
    scenes = all_scenes(held_out=False)
    for _ in range(500):
        scene = scenes[r.randrange(len(scenes))]
        other = examples.perturbed(scene, r, ("shape", "position"))
        changed = [k for k, v in scene.attributes().items() if other.attributes()[k] != v]
        assert len(changed) == 1 and changed[0] in ("shape", "position") and not other.held_out

    processor = skeleton_processor
    scene = Scene("red", "circle", "left", "blue")

    def answers(batches, seed):
        ids, _, labels, _, _ = batches.understanding([0] * 8, random.Random(seed))
        tok = processor.tokenizer
        out = []
        for row, lab in zip(ids, labels, strict=True):
            start = int((lab != -100).nonzero()[0])
            out.append(
                (
                    tok.decode(row[:start]),
                    tok.decode(lab[start:][lab[start:] != -100], skip_special_tokens=True),
                )
            )
        return out

    asked = answers(Batches(processor, _one_scene_pool(scene), yes_no=0.0, attribute_questions=1.0), 0)
    seen = set()
    for prompt, answer in asked:
        field = next(f for f, q in examples.ATTRIBUTE_QUESTIONS.items() if q in prompt)
        assert answer == " " + examples.attribute_answer(scene, field)
        seen.add(field)
    assert len(seen) >= 2
    assert examples.attribute_answer(scene, "position") == "on the left"
    assert examples.attribute_answer(Scene("red", "circle", "center", "blue"), "position") == "in the center"

    pairs = answers(Batches(processor, _one_scene_pool(scene), yes_no=1.0, negative_fields=("position",)), 1)
    assert [a for _, a in pairs] == [" yes", " no"] * 8  # each image asked twice
    for (own, _), (other, _) in zip(pairs[::2], pairs[1::2], strict=True):
        assert SCORE_QUESTION.format(prompt=caption(scene)) in own
        assert "a red circle" in other and "blue background" in other and "on the left" not in other

    # --prompt-readout: the score question's quoted prompt, then a request for one of its words back
    batches = Batches(
        processor, _one_scene_pool(scene), yes_no=1.0, negative_fields=("shape",), prompt_readout=1.0
    )
    rows = answers(batches, 3)
    assert {a for _, a in rows} >= {" circle"} and len(
        {a for _, a in rows}
    ) > 1  # the prompt's, not the image's
    for prompt, answer in rows:
        assert examples.READOUT_QUESTIONS["shape"].split('"')[0] in prompt and f"a red{answer} on the left" in prompt

    # --partial-prompts: shorter prompts in the caption's words; the pair still differs in the changed
    # attribute, and the shape (the noun) is always there
    assert examples.partial_caption(scene, {"shape"}) == "a circle"
    assert examples.partial_caption(scene, {"shape", "position"}) == "a circle on the left"
    assert examples.partial_caption(scene, {"color", "shape", "background"}) == "a red circle, blue background"
    assert examples.partial_caption(scene, set(ATTRIBUTES)) == caption(scene)
    batches = Batches(
        processor, _one_scene_pool(scene), yes_no=1.0, negative_fields=("shape",), partial_prompts=1.0
    )
    pairs = answers(batches, 2)
    quoted = [prompt.split('"')[1] for prompt, _ in pairs]
    assert len(set(quoted[::2])) > 1  # different subsets
    for own, other in zip(quoted[::2], quoted[1::2], strict=True):
        assert own.startswith("a ") and "circle" in own and "circle" not in other
        assert own.replace("circle", "") == other.replace("square", "").replace("triangle", "")


@pytest.mark.timeout(120)
def test_training_continues_from_a_shipped_checkpoint(tmp_path):
    """`--init-from`: a run whose --work folder is gone starts from a checkpoint's weights, keeps its VQ,
    warms the LR up again for the fresh optimizer, and the same command resumes instead of starting over."""
    from importlib import resources

    import torch
    from safetensors.torch import load_file

    shipped_dir = resources.files("janus.shapes") / "checkpoint"
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--out", str(out), "--work", str(work), "--init-from", str(shipped_dir), "--init-step", "300",
            "--vq-steps", "1250", "--llm-steps", "1000", "--stop-at", "302", "--pool", "64", "--gen-batch", "1", "--und-batch", "2",
            "--eval-every", "0", "--threads", "1", "--grid", "16", "--image-size", "64"]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
        state = torch.load(work / "llm_state.pt", weights_only=True)
        assert (state["step"], state["fresh_optimizer_at"]) == (302, 300)
        assert len(state["opt"]["state"]) > 0  # Adam's moments exist after the two new steps
        # the schedule goes on from step 300, scaled by the re-warm-up (2/100 at the second step)
        assert state["opt"]["param_groups"][0]["lr"] == pytest.approx(lr_at(1e-3, 301, 1000, 200) * 0.02)

        shipped = load_file(str(shipped_dir / "model.safetensors"))
        trained = load_file(str(out / "model.safetensors"))
        assert shipped.keys() == trained.keys()
        vq = [k for k in shipped if k.startswith("gen_vision_model.")]
        assert vq and all(torch.equal(shipped[k], trained[k]) for k in vq)  # the VQ is frozen, not retrained
        llm = [k for k in shipped if k.startswith("language_model.") and shipped[k].dim() == 2]
        moved = [k for k in llm if not torch.equal(shipped[k], trained[k])]
        assert moved, "two steps changed nothing"
        assert all(
            (shipped[k].float() - trained[k].float()).abs().max() < 0.01 for k in llm
        )  # a nudge, not a reset

        (out / "model.safetensors").unlink()
        assert main(argv) == 0  # resumes at step 302: nothing left to train, the same weights exported
        assert torch.equal(load_file(str(out / "model.safetensors"))[moved[0]], trained[moved[0]])
    finally:
        torch.set_num_threads(threads)


def test_plain_cells_are_pulled_to_one_code_per_colour(tmp_path):
    """`--vq-uniform-weight`: a flat 4x4 cell of colour k is pulled to code k wherever it is; cells on the
    shape's edge are left alone; the VQ trains with it and without code restarts."""
    import torch

    from janus.shapes import COLORS

    scene = Scene("red", "square", "center", "blue")
    x = to_unit(draw(scene)[None])
    flat, colour = uniform_cells(x)
    grid = flat.view(24, 24)
    assert grid[0, 0] and colour[0] == COLORS.index("blue")  # a corner: background
    assert grid[12, 12] and colour.view(24, 24)[12, 12] == COLORS.index("red")  # the square's middle
    assert 0 < int((~flat).sum()) < 100  # only the square's outline is mixed

    codebook = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    z = codebook[colour].clone()
    assert uniform_code_loss(x, z, codebook).item() == 0.0
    z[0] = codebook[9]
    assert uniform_code_loss(x, z, codebook).item() > 0.0

    torch.manual_seed(0)
    cfg = write_skeleton(tmp_path / "skeleton")
    vq = build_model(cfg).gen_vision_model
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ran = train_vq(vq, 2, 2, 0, tmp_path, 5.0, crop=48, restarts=False, uniform_weight=1.0)
    finally:
        torch.set_num_threads(threads)
    assert ran == 2 and (tmp_path / "vq_state.pt").exists()


def test_a_12_by_12_code_grid_trains_and_encodes_to_144_codes(tmp_path):
    """`--grid 12`: one more downsampling level (8 px per code) and the image size in the VQ's config;
    the shipped 24 x 24 config is written as before."""
    import torch

    assert vq_params(24)["ch_mult"] == [1, 2, 2] and "image_size" not in vq_params(24)
    assert vq_params(12)["ch_mult"] == [1, 2, 2, 2] and vq_params(12)["image_size"] == 96
    with pytest.raises(ValueError, match="power of two"):
        vq_params(10)
    # --image-size: 64 px at 16 x 16 is 4 px per code, the size in the config
    assert vq_params(16, 64)["ch_mult"] == [1, 2, 2] and vq_params(16, 64)["image_size"] == 64
    torch.manual_seed(0)
    cfg = write_skeleton(tmp_path / "skeleton", grid=12)
    vq = build_model(cfg).gen_vision_model
    assert (vq.config.grid, vq.config.image_tokens) == (12, 144)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert train_vq(vq, 2, 2, 0, tmp_path, 5.0, crop=48, uniform_weight=1.0) == 2
        vq.eval()
        assert vq_codes(vq, np.stack([draw(Scene("red", "circle", "left", "blue"))] * 3)).shape == (3, 144)
        assert 0.0 <= vq_roundtrip_accuracy(vq, 4, 0, jitter=False) <= 1.0
        # --exact-shapes: generation targets are the scenes drawn exactly, understanding keeps the jitter
        pool = Pool(vq, 6, 0, exact=True)
        exact = np.stack([draw(s) for s in pool.scenes])
        assert torch.equal(pool.codes, vq_codes(vq, exact))
        assert not np.array_equal(pool.images, exact)
        # 64 px at 16 x 16: the codes are of each scene drawn at 64 px with the same variations as its
        # 96 px pixels, and --vq-pixels' decoded images are 64 px
        small = build_model(write_skeleton(tmp_path / "small", grid=16, size=64)).gen_vision_model.eval()
        pool = Pool(small, 4, 0, decoded=True)
        at_64 = np.stack([draw(s, 64, np.random.default_rng([0, 3, i])) for i, s in enumerate(pool.scenes)])
        assert pool.images.shape == (4, 96, 96, 3) and pool.decoded.shape == (4, 64, 64, 3)
        assert torch.equal(pool.codes, vq_codes(small, at_64)) and pool.codes.shape == (4, 256)
        assert [judge(a)["position"] for a in at_64] == [judge(b)["position"] for b in pool.images]
        # --telling-weight's cells: where the scene drawn with another shape differs (exactly drawn
        # scenes: the same colours, so any pixel that differs); a varied scene's are its own variation's
        telling = pool.shape_telling()
        assert telling.shape == (4, 256) and telling.dtype == torch.bool and bool(telling.any(dim=1).all())
        exact_pool = Pool(small, 6, 0, exact=True)
        for scene, cells in zip(exact_pool.scenes, exact_pool.shape_telling(), strict=True):
            own = draw(scene, 64)
            differs = np.zeros((64, 64), dtype=bool)
            for shape in {"circle", "square", "triangle"} - {scene.shape}:
                other = draw(Scene(scene.color, shape, scene.position, scene.background), 64)
                differs |= (own != other).any(axis=-1)
            expected = differs.reshape(16, 4, 16, 4).any(axis=(1, 3)).reshape(-1)
            assert cells.tolist() == expected.tolist()
    finally:
        torch.set_num_threads(threads)


def test_pairs_start_at_the_step_pairs_from_names(skeleton_processor):
    """--pairs-from: before that step the understanding rows are phases 1-2's (captions and single
    questions, the same rows as --yes-no unset), from it on the yes/no pairs."""
    import torch

    processor = skeleton_processor
    pool = _one_scene_pool(Scene("red", "circle", "left", "blue"))
    late = Batches(processor, pool, yes_no=1.0, pairs_from=100)
    single = Batches(processor, pool)  # --yes-no unset
    before = late.understanding([0] * 8, random.Random(5), step=99)[0]
    assert before.shape[0] == 8 and torch.equal(before, single.understanding([0] * 8, random.Random(5))[0])
    assert late.understanding([0] * 8, random.Random(5), step=100)[0].shape[0] == 16  # each image asked twice
    assert late.understanding([0] * 8, random.Random(5))[0].shape[0] == 16  # no step: the flags as given


def test_a_bad_trainer_flag_is_one_line_and_exit_code_2(capsys):

    with pytest.raises(SystemExit) as exit_info:
        main(["--pairs-from", "abc"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and "--pairs-from: invalid int value: 'abc'" in err, err


def test_nothing_at_run_time_imports_the_trainer():
    """``training`` is a tool beside the package: no module of janus, pipeline or jobs names it in an import."""
    import ast

    from tests.support import REPO

    offenders = []
    for root in ("janus", "pipeline", "jobs"):
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] == "training"]
    assert not offenders, offenders



def test_text_first_rows_are_what_serve_renders_for_a_text_then_image_chat(skeleton_processor):
    """--text-first: a caption row with its question before the image is token for token the prompt Serve
    builds from an OpenAI chat whose text part comes before its image part (an image-first row: the other
    order's); the score's yes/no questions keep the image first; --vq-pixels: the row's pixels are the
    VQ's decoding of the scene, not its drawing."""
    import torch

    from janus.engine.prompts import SCORE_QUESTION, chat_prompt
    from pipeline.serve.inputs import chat_input
    from pipeline.serve.schemas import ChatMessage

    processor = skeleton_processor
    tok, tag = processor.tokenizer, processor.image_tag
    scene = Scene("red", "circle", "left", "blue")
    pool = _one_scene_pool(scene)
    pool.decoded = np.stack([draw(Scene("white", "square", "top", "black"))])

    def served(*parts: str | None) -> list[int]:
        """The ids Serve prefills for a user message of these parts (None: the image part)."""
        content = [{"type": "image_url", "image_url": {"url": "x"}} if p is None else {"type": "text", "text": p} for p in parts]
        conversation = chat_input([ChatMessage(role="user", content=content)], tag).conversation
        ids = torch.tensor(tok.encode(chat_prompt(processor, conversation)), dtype=torch.long)
        return processor.add_image_token((ids == processor.image_id).nonzero().flatten(), ids)[0].tolist()

    batches = Batches(processor, pool, yes_no=0.0, text_first=1.0)
    ids, _, labels, _, _ = batches.understanding([0] * 6, random.Random(0))
    asked = set()
    for row, lab in zip(ids, labels, strict=True):
        prompt = row[: int((lab != -100).nonzero()[0])].tolist()
        question = max((q for q in examples.CAPTION_QUESTIONS if q in tok.decode(prompt)), key=len)
        assert prompt == served(question, None)
        asked.add(question)
    assert len(asked) > 1
    image_first, _ = batches.understanding_ids(examples.CAPTION_QUESTIONS[0], caption(scene))
    assert image_first == served(None, examples.CAPTION_QUESTIONS[0]) != served(examples.CAPTION_QUESTIONS[0], None)

    pairs = Batches(processor, pool, yes_no=1.0, text_first=1.0).understanding([0] * 4, random.Random(0))[0]
    words = SCORE_QUESTION.split('"')[0]
    for row in pairs:
        text = tok.decode(row)
        assert words in text and text.index(tag) < text.index(words)

    drawn_pixels = Batches(processor, pool, yes_no=0.0).understanding([0], random.Random(0))[3]
    decoded_pixels = Batches(processor, pool, yes_no=0.0, vq_pixels=1.0).understanding([0], random.Random(0))[3]
    assert torch.equal(drawn_pixels, processor.image_processor([pool.images[0]], return_tensors="pt").pixel_values)
    assert torch.equal(decoded_pixels, processor.image_processor([pool.decoded[0]], return_tensors="pt").pixel_values)


@pytest.mark.timeout(60)
def test_the_readmes_rebuild_commands_are_the_trainers_flags():
    """The README's rebuild block is too long for its test to run (~5 h); its every training command is
    parsed here, so a renamed or dropped flag fails: the run, then its tail in the same work folder."""
    import re
    import shlex
    from pathlib import Path

    from training.shapes.cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "-m training.shapes" in b]
    lines = block.replace("\\\n", " ").splitlines()
    (common,) = [line for line in lines if line.startswith('T="')]
    base = shlex.split(common.split("-m training.shapes", 1)[1].rstrip('"'))
    runs = [shlex.split(line, comments=True)[1:] for line in lines if line.startswith("$T ")]
    assert len(runs) == 2
    parser = build_parser()
    first, tail = (parser.parse_args([*base, *run]) for run in runs)
    for args in (first, tail):
        assert (args.grid, args.image_size, args.exact_shapes) == (16, 64, False) and args.out
    # the tail resumes the first run's state and stretches its schedule
    assert tail.work == first.work and tail.llm_steps > first.llm_steps >= 1 and tail.stop_at > first.llm_steps
    assert tail.out == "janus/shapes/checkpoint"
