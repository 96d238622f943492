"""Generation aimed by the trainers: scores through the ring, claims by score, noise levels, pair weighting."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_training
from test_methods import method_for, views_for

from onlinemix.cache import CacheReader, ShardWriter
from onlinemix.cache.transfer import export, import_tars
from onlinemix.core.config import Config, ConfigError, GeneratorConfig, load_config
from onlinemix.core.schedule import EpochSchedule
from onlinemix.exchange.aim import AimPublisher, choose_positions, hard_scores, next_noise, stale_scores
from onlinemix.exchange.ring import I, PairRing, ProducerPort, S, TrainerPort
from onlinemix.generation.generator import GeneratorError, make_generator
from onlinemix.generation.producer import RingWork, producer_port
from onlinemix.methods.base import pair_weights
from onlinemix.methods.build import StepInfo
from onlinemix.tools.simulate import Rates, simulate

IMAGES = 64


# ----------------------------------------------------------------------------- the rules


def test_choose_positions_takes_the_highest_scores_in_position_order_and_ties_go_first_come() -> None:
    positions = np.arange(10, 20)
    scores = np.array([0, 5, 1, 5, 9, 0, 0, 0, 0, 2], dtype=np.float32)
    assert choose_positions(positions, scores, 3).tolist() == [11, 13, 14]
    assert choose_positions(positions, np.zeros(10, dtype=np.float32), 4).tolist() == [10, 11, 12, 13]
    assert choose_positions(positions[:2], scores[:2], 5).tolist() == [10, 11]


def test_scores_rank_worn_variations_and_badly_matched_pairs_first() -> None:
    assert stale_scores(np.array([0, 3, 0]), np.array([0, 0, 2])).tolist() == [1, 4, 3]
    assert hard_scores(np.array([1.0, 0.0, -1.0])).tolist() == [0, 1, 2]


def test_noise_moves_up_for_easy_pairs_down_for_hard_ones_within_bounds() -> None:
    levels = np.array([0.2, 0.2, 0.2], dtype=np.float32)
    moved = next_noise(levels, np.array([0.9, 0.5, 0.1]), low=0.0, high=0.5)
    assert moved[0] > 0.2 and moved[1] == pytest.approx(0.2) and moved[2] < 0.2
    at_bounds = next_noise(np.array([0.5, 0.0], dtype=np.float32), np.array([0.9, 0.1]), low=0.0, high=0.5)
    assert at_bounds.tolist() == [0.5, 0.0]  # easy but at the top, hard but at the bottom


# ----------------------------------------------------------------------------- through the ring


def test_scores_and_noise_written_by_a_trainer_are_read_by_a_producer_of_another_attachment(no_leaked_segments):
    ring = PairRing.create(slots=4, resolution=2, images=IMAGES, noise=0.1)
    other = PairRing.attach(ring.name)  # as a producer process attaches
    try:
        producer = ProducerPort(other, capacity=4, lead_factor=0)
        assert np.isinf(producer.scores(np.arange(IMAGES))).all()  # nobody has trained on any image yet
        assert np.allclose(producer.noise_levels(np.arange(IMAGES)), 0.1)
        trainer = TrainerPort(ring, leader=True)
        trainer.publish_scores(np.array([3, 7]), np.array([0.5, 2.0], dtype=np.float32))
        trainer.publish_noise(np.array([7]), np.array([0.3], dtype=np.float32))
        assert producer.scores(np.array([3, 7, 8])).tolist() == [0.5, 2.0, np.inf]
        assert producer.noise_levels(np.array([7, 8])) == pytest.approx([0.3, 0.1])
    finally:
        other.close()
        ring.close()


def test_an_aimed_claim_spans_as_many_positions_per_pair_as_it_may_make() -> None:
    ring = PairRing.local(slots=16, images=IMAGES)
    port = ProducerPort(ring, capacity=16, lead_factor=0, producers=2)
    TrainerPort(ring, leader=True).publish_speed(1000, 1.0)  # 1000 positions/s
    port.observe_batch(0.05)  # a batch takes 50 ms: 50 positions pass, 25 for each of the 2 producers
    assert port.passed_per_batch() == pytest.approx(25)
    claim = port.claim(4, positions_per_pair=6.25)
    assert claim.positions.tolist() == list(range(25)) and claim.most == 4
    assert port.claim(4).positions.tolist() == [25, 26, 27, 28]  # the span's other positions are passed over
    # The trainers moved 20 positions: a claim reaches 25 past them, from the 29 claimed already.
    TrainerPort(ring, leader=True).publish_position(20)
    assert port.claim(4, positions_per_pair=6.25).positions.tolist() == list(range(29, 45))
    TrainerPort(ring, leader=True).publish_position(40)  # room for 2 pairs: 12 positions past them, from 45
    small = ProducerPort(ring, capacity=2, lead_factor=0).claim(4, positions_per_pair=6.25)
    assert small.most == 2 and small.positions.tolist() == list(range(45, 52))
    assert port.claim(4, positions_per_pair=6.25).positions.tolist() == list(range(52, 65))
    assert port.claim(4, positions_per_pair=6.25).positions.tolist() == [65, 66, 67, 68]  # at the reach: its pairs


def aimed_work(aim: str, scores: np.ndarray, **producer: str) -> tuple[RingWork, PairRing, EpochSchedule]:
    cfg = load_config(None, {"generator.aim": aim, "generator.batch_size": "4", "train.batch_size": "8",
                             "ring.slots": "64", "producer.lead_factor": "0",
                             **{f"producer.{k}": v for k, v in producer.items()}})
    ring = PairRing.local(cfg.ring.slots, images=IMAGES)
    schedule = EpochSchedule(np.arange(IMAGES), 8, seed=0)
    port = producer_port(ring, cfg, node_batch=8, producers=1, index=0)
    trainer = TrainerPort(ring, leader=True)
    trainer.publish_scores(np.arange(IMAGES), scores.astype(np.float32))
    trainer.publish_speed(400, 1.0)
    port.observe_batch(0.1)  # 40 positions pass during a batch
    return RingWork(port, schedule, cfg), ring, schedule


def test_aimed_producers_generate_for_the_highest_scores_ahead_of_the_trainers() -> None:
    scores = np.random.default_rng(0).random(IMAGES)
    work, ring, schedule = aimed_work("hard", scores)
    TrainerPort(ring, leader=True).publish_position(8)
    batch = work.next()
    window = schedule.ids_at(np.arange(8, 48))
    assert sorted(batch.ids.tolist()) == sorted(window[np.argsort(-scores[window])[:4]].tolist())
    assert (batch.positions >= 8).all()  # all for batches the trainers have not looked up yet
    plain, _, _ = aimed_work("none", scores)
    ring = plain.port.ring
    TrainerPort(ring, leader=True).publish_position(8)
    assert plain.next().positions.tolist() == [8, 9, 10, 11]  # unaimed: the trainers' order


def test_an_aimed_producer_spends_its_budget_at_the_trainers_pace_to_the_end() -> None:
    """Claims under a budget span the positions the budget gives their pairs: the claim pointer keeps pace with
    the trainers instead of running to the end of training while the budget trickles in."""
    # 4 pairs an epoch of 64 positions, fewer than the 40 / 4 = 10 positions a pair takes to make allow: the budget
    # binds, and a claim spans 16 positions per pair.
    work, ring, schedule = aimed_work("hard", np.random.default_rng(1).random(IMAGES), max_pairs_per_epoch="4")
    assert work.positions_per_pair() == 16
    trainers, made = TrainerPort(ring, leader=True), 0
    for position in range(0, work.end, 8):  # the trainers' batches, one after another
        trainers.publish_position(position)
        while (batch := work.next()) is not None:
            made += len(batch.ids)
            assert (batch.positions >= position).all()
        # at most an epoch and a batch ahead (a claim past the end of training makes nothing, so it may go there)
        assert min(ring.header.gen_pos, work.end) <= position + 2 * schedule.positions_per_epoch
    assert made >= 4 * (work.end // schedule.positions_per_epoch) - 4  # the budget spent, all along training


def test_a_generation_budget_is_paced_along_training() -> None:
    work, ring, schedule = aimed_work("none", np.zeros(IMAGES), max_pairs_per_epoch="16")
    made = 0
    while (batch := work.next()) is not None:
        made += len(batch.ids)
    assert made == 4  # one batch to start on, before the trainers have moved
    TrainerPort(ring, leader=True).publish_position(IMAGES // 2)  # half an epoch: 8 more allowed
    while (batch := work.next()) is not None:
        made += len(batch.ids)
    assert made == 4 + 8 and ring.header.budget_used == 12


def test_the_trainers_publisher_scores_every_row_and_moves_noise_of_synthetic_rows_only() -> None:
    ring = PairRing.local(slots=4, images=IMAGES)
    port = TrainerPort(ring, leader=True)
    ids, synthetic = np.array([1, 2, 3]), np.array([True, False, True])
    uses, age, similarity = np.array([2, 0, 0]), np.array([1, 0, 0]), np.array([0.9, 0.2, 0.1], dtype=np.float32)
    cfg = GeneratorConfig(aim="stale", strength="adaptive", noise=0.2, noise_max=0.4)
    ring.image_table[:, I.noise] = 0.2
    AimPublisher(port, cfg).publish(ids, synthetic, uses, age, similarity)
    assert ring.image_table[ids, I.score].tolist() == [4, np.inf, 1]  # a fallback row: no variation there
    assert ring.image_table[2, I.noise] == pytest.approx(0.2)  # a fallback: no variation to judge
    assert ring.image_table[1, I.noise] > 0.2 > ring.image_table[3, I.noise]
    AimPublisher(port, replace(cfg, aim="hard")).publish(ids, synthetic, uses, age, similarity)
    assert ring.image_table[ids, I.score] == pytest.approx([0.1, 0.8, 0.9])  # the real pair counts too


def test_the_simulator_runs_the_same_aim_and_hard_aims_at_the_hard_images() -> None:
    cfg = load_config(None, {"train.batch_size": "64", "ring.slots": "512", "generator.batch_size": "4"})
    rates = Rates(gen_pairs_s=20, step_s=0.05)
    runs = {aim: simulate(replace(cfg, generator=replace(cfg.generator, aim=aim)), 2048, rates, epochs=3)
            for aim in ("none", "stale", "hard")}
    assert runs["none"].similarity is None
    similarity = runs["hard"].similarity
    assert similarity[runs["hard"].generated_ids].mean() < similarity.mean() - 0.15
    assert runs["stale"].images_varied >= runs["none"].images_varied


# ----------------------------------------------------------------------------- noise and the cache


def test_noise_changes_only_the_rows_that_have_it_and_is_reproducible(one_torch_thread) -> None:
    generator = make_generator(GeneratorConfig(model="stub", steps=2), "cpu", 16)
    images = torch.randint(0, 255, (3, 3, 16, 16), dtype=torch.uint8)
    plain = generator.generate(images, [1, 2, 3])
    levels = np.array([0.0, 0.5, 0.5], dtype=np.float32)
    noisy = generator.generate(images, [1, 2, 3], levels)
    assert torch.equal(noisy[0], plain[0]) and not torch.equal(noisy[1], plain[1])
    assert torch.equal(generator.generate(images, [1, 2, 3], levels), noisy)
    with pytest.raises(ValueError, match="noise levels"):
        generator.generate(images, [1, 2, 3], np.array([0.1, -0.1, 0.0]))


def test_versatile_generators_refuse_noise(one_torch_thread) -> None:
    generator = make_generator(GeneratorConfig(model="stub", steps=1, pipeline="versatile"), "cpu", 16)
    with pytest.raises(GeneratorError, match="noise"):
        generator.generate(torch.zeros((1, 3, 16, 16), dtype=torch.uint8), [0], np.array([0.2]))


def test_a_variations_noise_is_kept_in_the_cache_and_keeps_it_distinct_through_export(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / "a", "key", {"fingerprint": "f" * 16, "dataset": "d"}, 2, 8, flush_s=0)
    image = np.full((3, 2, 2), 7, dtype=np.uint8)
    writer.add(5, 11, 0, image, noise=0.0)
    writer.add(5, 11, 0, image + 1, noise=0.25)  # same image and seed, another noise: another variation
    writer.close()
    variations = CacheReader(tmp_path / "a", "key", 2).variations(5)
    assert sorted(v.noise for v in variations) == [0.0, 0.25]
    export(tmp_path / "a", tmp_path / "tars", ["key"], maxcount=8)
    assert import_tars(tmp_path / "b", [str(tmp_path / "tars")], shard_pairs=8)[:2] == (2, 0)
    assert import_tars(tmp_path / "b", [str(tmp_path / "tars")], shard_pairs=8)[:2] == (0, 2)  # both present


def test_ring_slots_record_the_noise_each_pair_was_made_with() -> None:
    ring = PairRing.local(slots=2, images=IMAGES)
    pixels = np.zeros((1, 3, 1, 1), dtype=np.uint8)
    port = ProducerPort(ring, capacity=2, lead_factor=0)
    port.place(pixels, pixels, np.array([4]), np.array([0]), [9], np.array([0]), max_age=4,
               noises=np.array([0.125]))
    slot = int(np.flatnonzero(ring.meta[:, S.state] == 2)[0])
    assert ring.meta[slot, S.noise_milli] == 125


# ----------------------------------------------------------------------------- the methods' side


@pytest.mark.parametrize("name", ["simclr", "barlowtwins", "dino"])
def test_every_method_records_its_pair_similarity_and_equal_weights_change_nothing(name: str) -> None:
    torch.manual_seed(0)
    method = method_for(name)
    views = views_for(method)
    views = replace(views, images=[v + torch.randn_like(v) for v in views.images])  # rows differ: weights matter
    loss, _ = method(views, StepInfo(0, 0, 10))
    similarity = method.pair_similarity
    assert similarity.shape == (views.images[0].shape[0],) and not similarity.requires_grad
    assert (similarity.abs() <= 1 + 1e-5).all()
    weighted = method_for(name, pair_weighting="true")
    weighted.load_state_dict(method.state_dict())
    if name == "dino":
        weighted.teacher.net.load_state_dict(method.teacher.net.state_dict())
    weighted.observe_pairs = lambda a, b: torch.ones(len(a))  # equal weights: the plain loss
    assert weighted(views, StepInfo(0, 0, 10))[0].item() == pytest.approx(loss.item(), rel=1e-5)
    weighted.observe_pairs = lambda a, b: torch.linspace(0.2, 1.8, len(a))
    assert weighted(views, StepInfo(0, 0, 10))[0].item() != pytest.approx(loss.item(), rel=1e-4)


def test_pair_weights_favour_matched_pairs_and_average_one() -> None:
    weights = pair_weights(torch.tensor([1.0, 0.0, -0.5]))
    assert weights.mean().item() == pytest.approx(1.0)
    assert weights[0] > weights[1] > weights[2] > 0


@pytest.mark.parametrize(("overrides", "message"), [
    ({"generator.noise_min": "0.3", "generator.noise_max": "0.2"}, "noise_min"),
    ({"generator.strength": "adaptive", "generator.noise": "0.9"}, "must lie within"),
    ({"generator.pipeline": "versatile", "generator.noise": "0.1"}, "does not support"),
    ({"train.method": "supervised", "train.pair_weighting": "true"}, "supervised"),
])
def test_aim_settings_that_cannot_run_are_config_errors(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_defaults_leave_generation_unaimed() -> None:
    g = Config().generator
    assert (g.aim, g.strength, g.noise, Config().train.pair_weighting, Config().producer.max_pairs_per_epoch) == \
        ("none", "fixed", 0.0, False, 0)


def test_an_aimed_online_run_trains_and_caches_each_variations_noise(tmp_path: Path, no_leaked_segments) -> None:
    """The whole loop on a quarter of the digits: trainers publish scores and noise levels, producers aim by
    them, the loss weighs the pairs, and the cache records the level each variation was made with."""
    proc = run_training("--train.epochs", "1", "--data.real-fraction", "0.25", "--output-dir", str(tmp_path),
                        "--run-name", "aimed", "--generator.aim", "hard", "--generator.strength", "adaptive",
                        "--generator.noise", "0.1", "--generator.noise-max", "0.3", "--train.pair-weighting", "true",
                        "--probe.enabled", "false", "--train.batch-size", "64", "--data.resolution", "16",
                        "--probe.knn-every", "0", "--generator.model", "stub", "--staleness.policy", "wait")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "aimed" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if "step" in r][-1]["total_fresh"] > 0
    assert "aim hard (the pairs the model matches worst first); noise adapted per image within [0, 0.3]" in \
        (tmp_path / "aimed" / "train.log").read_text()
    records = list((tmp_path / "cache").glob("*/index/*.json"))
    noises = {x for r in records for x in json.loads(r.read_text()).get("noises", [])}
    assert 0.1 in noises and all(0 <= x <= 0.3 for x in noises)
