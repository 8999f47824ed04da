"""Continuous batching: a request's tokens do not depend on who shares the batch or when it joined."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from janus.engine import CaptionEngine, SynthesisEngine
from janus.engine.common import CANCELLED, INVALID_REQUEST, OUT_OF_MEMORY
from janus.engine.scheduler import BackgroundScheduler, Scheduler
from tests.support.checkpoints import grid_10_model

pytestmark = pytest.mark.timeout(300)

SYNTH = [
    {"prompt": "a red apple on a table", "seed": 1},
    {"prompt": "a cat", "seed": 7, "cfg_weight": 3.0},
    {"prompt": "two dogs in the snow, photo", "seed": 3, "temperature": 0.0},
    {"prompt": "a blue house", "seed": 11, "top_k": 50},
]


@pytest.fixture(scope="module")
def synth(tiny_model, tiny_processor):
    return SynthesisEngine(tiny_model, tiny_processor, max_batch_size=4)


@pytest.fixture(scope="module")
def captioner(tiny_model, tiny_processor):
    return CaptionEngine(tiny_model, tiny_processor, max_batch_size=4)


@pytest.fixture(scope="module")
def synth_alone(synth):
    """Each request run alone through the static engine: the oracle."""
    return [synth.generate([r])[0].tokens for r in SYNTH]


def _run_joining(scheduler: Scheduler, requests: list, join_steps: list[int]):
    """Submit request i once the scheduler has made ``join_steps[i]`` decode steps; run to the end."""
    tickets = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: join_steps[i])
    for i in order:
        while scheduler.steps < join_steps[i]:
            assert not scheduler.idle, "nothing left to run before the join step"
            scheduler.step()
        tickets[i] = scheduler.submit(requests[i])
    scheduler.run_until_idle()
    return [t.result for t in tickets]


def test_images_join_at_the_start_the_middle_and_near_the_end(synth, synth_alone):
    scheduler = Scheduler(synth, slots=8)
    # request 0 starts alone; 1 joins at step 0 of it, 2 in the middle, 3 four steps before 0 ends
    results = _run_joining(scheduler, SYNTH, [0, 0, 288, 571])
    for res, alone in zip(results, synth_alone, strict=True):
        assert res.ok and np.array_equal(res.tokens, alone)
    assert scheduler.free == list(range(scheduler.slots))  # every slot came back


def test_a_full_pool_queues_requests_until_slots_free(synth, synth_alone):
    scheduler = Scheduler(synth, slots=2)  # one synthesis request at a time
    results = _run_joining(scheduler, SYNTH[:3], [0, 0, 0])
    assert scheduler.peak_running == 1  # a request holds two rows (cond + uncond): one runs at a time
    for res, alone in zip(results, synth_alone[:3], strict=True):
        assert res.ok and np.array_equal(res.tokens, alone)


def test_images_are_the_static_engines_images(synth):
    alone = synth.generate([SYNTH[0]])[0]
    scheduler = Scheduler(synth, slots=4)
    ticket = scheduler.submit(SYNTH[0])
    scheduler.run_until_idle()
    assert np.array_equal(ticket.result.image, alone.image)


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40 + 9 * i, 64, 3), dtype=np.uint8) for i in range(n)]


def test_captions_join_and_leave_at_every_step(captioner):
    images = _images(4)
    requests = [
        {"image": images[0], "max_new_tokens": 30},
        {"image": images[1], "max_new_tokens": 5, "temperature": 1.0, "seed": 5},
        {"image": images[2], "max_new_tokens": 17, "question": "What is in the picture?"},
        {"image": images[3], "max_new_tokens": 9, "temperature": 0.8, "top_p": 0.9, "seed": 2},
    ]
    alone = [captioner.generate([r])[0] for r in requests]
    # two slots: short answers leave early and free their slot for the next in line
    results = _run_joining(Scheduler(captioner, slots=2), requests, [0, 1, 3, 20])
    for res, want in zip(results, alone, strict=True):
        assert res.ok
        assert (res.text, res.num_tokens, res.finish_reason) == (want.text, want.num_tokens, want.finish_reason)


def test_tokens_stream_as_they_are_made(captioner):
    streamed: list[int] = []
    scheduler = Scheduler(captioner, slots=2)
    ticket = scheduler.submit({"image": _images(1)[0], "max_new_tokens": 12}, on_token=streamed.append)
    scheduler.step()  # admission's prefill makes the first token, the step's decode the second
    assert len(streamed) == 2
    scheduler.step()  # then one token a step, each handed over as soon as it is made
    assert len(streamed) == 3
    scheduler.run_until_idle()
    assert streamed == ticket.tokens[: ticket.result.num_tokens]
    assert captioner.tokenizer.decode(streamed, skip_special_tokens=True) == ticket.result.text


def test_on_tokens_follows_each_round_of_tokens(captioner):
    """The hook the Serve replica hands tokens on with: once after a prefill's first tokens and once after
    each decode step, when that round's tokens are already with the callbacks, before the request ends."""
    seen: list[list[int]] = []
    streamed: dict[int, list[int]] = {0: [], 1: []}
    scheduler = Scheduler(captioner, slots=2)
    scheduler.on_tokens = lambda: seen.append([len(streamed[0]), len(streamed[1])])
    images = _images(2)
    tickets = [
        scheduler.submit({"image": images[i], "max_new_tokens": n}, on_token=streamed[i].append)
        for i, n in enumerate((3, 5))
    ]
    done_at: list[int] = []
    tickets[0].add_done_callback(lambda t: done_at.append(len(seen)))
    scheduler.run_until_idle()
    # both prefilled together (one round), then one round per decode step until the longer one ends
    assert seen == [[1, 1], [2, 2], [3, 3], [3, 4], [3, 5]], seen
    assert done_at == [3]  # the shorter request ended after its last round was handed on
    assert all(t.result.num_tokens == n for t, n in zip(tickets, (3, 5), strict=True))


def test_rounds_are_timed_for_the_first_token_yardstick(captioner):
    """Serve sets a request's time to first token against what its batch cost (prefill + 2 decode
    steps): the scheduler times each admission round with how many it prefilled and each decode step
    with how many rows it ran, and stamps when a request left the queue."""
    scheduler = Scheduler(captioner, slots=2)
    images = _images(3)
    first = scheduler.submit({"image": images[0], "max_new_tokens": 4})
    scheduler.step()  # A alone: one admission of 1, one decode step of 1
    pair = [scheduler.submit({"image": im, "max_new_tokens": 3}) for im in images[1:]]
    scheduler.run_until_idle()  # one joins A at once; the other when A's slot frees
    stats = scheduler.stats
    assert [n for n, _ in stats.prefill.latest] == [1, 1, 1]
    assert scheduler.prefills == stats.prefill.count == 3
    rows = [n for n, _ in stats.decode.latest]
    assert len(rows) == scheduler.steps == stats.decode.count and rows[:3] == [1, 2, 2], rows
    assert all(t > 0 for _, t in [*stats.prefill.latest, *stats.decode.latest])
    for ticket in [first, *pair]:
        assert ticket.submitted_at <= ticket.admitted_at <= ticket.first_token_at
    assert pair[1].admitted_at > pair[0].first_token_at  # it waited in the queue for a free slot


def test_the_cache_stays_allocated_between_bursts_and_answers_stay_the_same(synth, synth_alone):
    """A server that goes quiet keeps its cache (allocating it cost a request at a quiet server ~86 ms
    before its first token on a CPU core, 4x its prefill); requests after the pause still get exactly
    their own tokens from rows whose old keys they must not see. If the engine's static path took the
    decoder meanwhile, the scheduler allocates its cache again instead of using a foreign one."""
    scheduler = Scheduler(synth, slots=4)
    first = scheduler.submit(SYNTH[2])
    scheduler.run_until_idle()
    cache = synth.decoder.k_cache
    assert cache is not None and scheduler.allocations == 1  # idle, and the cache is still there
    later = _run_joining(scheduler, [SYNTH[1], SYNTH[0]], [0, 40])
    assert synth.decoder.k_cache is cache and scheduler.allocations == 1
    assert np.array_equal(first.result.tokens, synth_alone[2])
    for res, alone in zip(later, [synth_alone[1], synth_alone[0]], strict=True):
        assert res.ok and np.array_equal(res.tokens, alone)
    synth.generate([SYNTH[3]])  # the static engine frees the shared decoder's cache after its batch
    again = scheduler.submit(SYNTH[3])
    scheduler.run_until_idle()
    assert scheduler.allocations == 2 and np.array_equal(again.result.tokens, synth_alone[3])
    scheduler.release()
    assert synth.decoder.k_cache is None
    freeing = Scheduler(synth, slots=2, keep_cache=False)
    freeing.submit(SYNTH[0])
    freeing.run_until_idle()
    assert synth.decoder.k_cache is None  # keep_cache=False: freed when the last request left


def test_a_step_computes_only_the_rows_in_use(synth, synth_alone, monkeypatch):
    """One image request in a 16-row pool decodes 2 rows a step, not 16 (computing the empty rows made
    a lone request at a quiet CPU server take 15 s instead of ~4 s); a second request takes the next
    lowest rows, and once the first leaves, its rows go idle but the second's are still computed."""
    widths: list[int] = []
    original = synth.decoder.decode_window

    def spy(embeds, *args, **kwargs):
        widths.append(embeds.shape[0])
        return original(embeds, *args, **kwargs)

    monkeypatch.setattr(synth.decoder, "decode_window", spy)
    scheduler = Scheduler(synth, slots=16)
    results = _run_joining(scheduler, [SYNTH[0], SYNTH[2]], [0, 100])
    assert widths[:100] == [2] * 100 and set(widths[100:]) == {4}
    for res, alone in zip(results, [synth_alone[0], synth_alone[2]], strict=True):
        assert res.ok and np.array_equal(res.tokens, alone)


def test_bad_requests_fail_alone_and_cancelled_ones_free_their_slots(synth, synth_alone):
    scheduler = Scheduler(synth, slots=4, max_len=600)
    good = scheduler.submit(SYNTH[0])
    bad = scheduler.submit({"prompt": ""})
    too_long = scheduler.submit({"prompt": "word " * 80})  # prompt + 576 codes > 600 positions
    doomed = scheduler.submit(SYNTH[1])
    for _ in range(3):
        scheduler.step()
    assert bad.result.code == INVALID_REQUEST and too_long.result.code == OUT_OF_MEMORY
    assert len(scheduler.running) == 2
    doomed.cancel()
    scheduler.step()
    assert doomed.result.code == CANCELLED and len(scheduler.free) == 2
    scheduler.run_until_idle()
    assert np.array_equal(good.result.tokens, synth_alone[0])


def test_a_queued_request_cancelled_from_another_thread_never_runs(captioner, monkeypatch):
    """A client that leaves while its request waits: the cancel comes from another thread at any
    moment, here while the scheduler prepares the request before it in the same admission round. The
    request is never prepared nor prefilled, and ends cancelled."""
    scheduler = Scheduler(captioner, slots=2)
    images = _images(2)
    first, queued = (scheduler.submit({"image": im, "max_new_tokens": 8}) for im in images)
    prepared: list[int] = []
    real = captioner.prepare

    def prepare(index, request):
        if index == first.id:  # the client of the next request leaves meanwhile
            leaving = threading.Thread(target=queued.cancel)
            leaving.start()
            leaving.join()
        prepared.append(index)
        return real(index, request)

    monkeypatch.setattr(captioner, "prepare", prepare)
    scheduler.step()
    assert prepared == [first.id] and queued.admitted_at is None
    assert queued.done and queued.result.code == CANCELLED
    assert [run.ticket for run in scheduler.running] == [first]
    scheduler.run_until_idle()
    assert first.result.ok and prepared == [first.id]


def test_the_background_loop_serves_concurrent_callers(captioner):
    images = _images(3)
    alone = [captioner.generate([{"image": im, "max_new_tokens": 8}])[0].text for im in images]
    loop = BackgroundScheduler(Scheduler(captioner, slots=2))
    try:
        results: dict[int, str] = {}

        def ask(i: int) -> None:
            results[i] = loop.submit({"image": images[i], "max_new_tokens": 8}).wait(timeout=120).text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert results == dict(enumerate(alone))
    finally:
        loop.close()


def test_the_cache_is_sized_by_memory(synth, monkeypatch):
    import janus.engine.scheduler as sched

    per_row = synth.decoder.cache_bytes(1, 1024, synth.dtype)
    monkeypatch.setattr(sched, "available_memory", lambda device: int(5.5 * per_row / synth.memory_fraction))
    assert Scheduler(synth, slots=64, max_len=1024).slots == 4  # 5 rows fit; synthesis takes pairs
    assert torch.is_grad_enabled()


def test_a_model_with_a_smaller_code_grid_makes_its_own_number_of_codes(tmp_path):
    """A shrunk VQ may set its generated image's size (gen_vision_config ``image_size``): the engine and
    the scheduler then make grid x grid codes, not Janus' 576, and the same ones."""
    model, processor = grid_10_model(tmp_path / "m")
    engine = SynthesisEngine(model, processor, max_batch_size=2)
    assert (engine.grid, engine.image_tokens, engine.image_size) == (10, 100, 20)
    alone = engine.generate(SYNTH[:2])
    assert all(r.ok and r.tokens.shape == (100,) and r.image.shape == (20, 20, 3) for r in alone)
    scheduler = Scheduler(engine, slots=4)
    results = _run_joining(scheduler, SYNTH[:2], [0, 37])
    for res, ref in zip(results, alone, strict=True):
        assert res.ok and np.array_equal(res.tokens, ref.tokens) and np.array_equal(res.image, ref.image)
