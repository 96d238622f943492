"""Train a self-supervised model with synthetic views generated on the fly.

    accelerate launch onlinemix/train.py --gen-gpus 2
    python -m onlinemix.train            # the same, one process

The launching process of each node creates the shared-memory ring and starts the
producers; every trainer rank attaches to the ring by name, looks up its batch's pairs,
augments them and steps the optimizer. Checkpoints, metrics and the resolved config go
to a run directory; a linear probe on real images closes the run.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    # Started as a file (`accelerate launch onlinemix/train.py`): Python put this folder first on sys.path, where
    # the package's own modules (config, data, cache, ...) would shadow installed modules of those names. Take it
    # off and run the installed package's module instead: this process and the producers it spawns (which inherit
    # sys.path and re-import the main module by name) then import the package only.
    import os
    import runpy

    here = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
    try:
        import onlinemix  # noqa: F401
    except ImportError:
        sys.exit("error: onlinemix is not installed in this environment; install it first (the README's Quick start)")
    runpy.run_module("onlinemix.train", run_name="__main__", alter_sys=True)
    sys.exit(0)

import logging
import os
import threading
import time
from collections import Counter
from contextlib import ExitStack, nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from safetensors.torch import save_file
from tqdm.auto import tqdm

from onlinemix.cache import check_writable
from onlinemix.core.cli import StopRequests, parse_args, stop_on_sigterm, stopped_by
from onlinemix.core.config import (
    Config,
    ConfigError,
    needs_synthetic_views,
    save_config,
)
from onlinemix.core.devices import NodeLaunch, producer_devices
from onlinemix.core.errors import UserError
from onlinemix.core.files import unwritable_reason, write_json
from onlinemix.data import RealImages, load_real_images, select_train_ids
from onlinemix.evaluation.probe import (
    compare_with_random_init,
    extract_features,
    format_probe,
    heldout_knn,
    heldout_linear,
)
from onlinemix.exchange.aim import AimPublisher, is_aimed
from onlinemix.exchange.lookup import ORIGINS, BatchPairs, PairSource, SecondViews
from onlinemix.exchange.ring import TrainerPort
from onlinemix.methods.build import StepInfo, build_method
from onlinemix.methods.optim import build_optimizer, cosine_with_warmup, scaled_lr
from onlinemix.training.checkpoint import (
    CheckpointSchedule,
    checkpoint_dir,
    load_checkpoint,
    newest_checkpoint,
    save_checkpoint,
)
from onlinemix.training.metrics import RunMetrics
from onlinemix.training.node import NodePairs, local_world_size, node_schedule, open_pairs
from onlinemix.training.prefetch import Prefetcher, Prepared, to_device
from onlinemix.training.rundir import BACKBONE_FILE, hold_run_dir
from onlinemix.training.start import make_run_dir, resolve_config, set_aside_metrics, setup_logging
from onlinemix.training.tracking import SUMMARY_FILE, chosen_tracker, format_summary, start_tracking
from onlinemix.views.backends import choose_backend, make_backend
from onlinemix.views.compose import Augmentation, ViewComposer, Views, build_pairing

log = logging.getLogger("onlinemix")

class Trainer:
    """One trainer rank: model, optimizer, schedule and the training loop."""

    def __init__(self, cfg: Config, accelerator: Accelerator, run_dir: Path, real: RealImages) -> None:
        self.cfg = cfg
        self.acc = accelerator
        self.run_dir = run_dir
        self.real = real
        tc = cfg.train
        self.schedule = node_schedule(accelerator, real, cfg)  # this node's positions; its producers follow it
        self.total_steps = self.schedule.steps_per_epoch * tc.epochs
        self.warmup_steps = int(tc.warmup_epochs * self.schedule.steps_per_epoch)
        method = build_method(cfg, len(real.classes))  # initial weights depend on train.seed only
        if accelerator.num_processes > 1 and accelerator.device.type == "cuda":  # SyncBatchNorm is CUDA-only
            method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
            for module in method.outside_modules():  # converted in place: their roots are not BatchNorms
                torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        self.base_lr = scaled_lr(tc.lr, self.schedule.global_batch) if tc.lr_scaling == "linear" else tc.lr
        optimizer = build_optimizer(tc.optimizer, method, self.base_lr, tc.weight_decay, tc.momentum)
        self.model, self.optimizer = accelerator.prepare(method, optimizer)
        self.method = method
        # DINO's teacher: no DDP, no optimizer; moved here and saved with accelerate's checkpoints.
        for module in method.outside_modules():
            module.to(accelerator.device)
            accelerator.register_for_checkpointing(module)
        self.last_logs: dict[str, float] = {}
        self.step = 0
        self.checkpoint: Path | None = None  # the checkpoint last saved or loaded
        self.cache_uses: Counter[tuple[str, int]] = Counter()  # disk cache variations taken by trained steps
        self.resumed_metrics: dict | None = None
        # Augmentation randomness per rank, reproducible from the seed.
        rank_seed = tc.seed * 1000 + accelerator.process_index + 1
        backend, why = choose_backend(tc.augment_backend, accelerator.device, cfg.data.resolution)
        log.info("views: %s backend (%s)", backend, why)
        self.compose_views = ViewComposer(method.view_plan, build_pairing(tc), Augmentation.from_config(cfg),
                                          cfg.data.resolution, rank_seed, real.labels,
                                          make_backend(backend, accelerator.device, rank_seed))
        torch.manual_seed(rank_seed)

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self, metrics: RunMetrics) -> None:
        """Everything a resumed run needs to continue exactly (onlinemix/training/checkpoint.py): accelerate's state,
        and this rank's metrics totals and cache use counts."""
        counters = {"metrics": metrics.state(),
                    "cache_uses": [[shard, row, n] for (shard, row), n in sorted(self.cache_uses.items())]}
        self.checkpoint = save_checkpoint(self.acc, self.run_dir, self.step, counters, self.cfg.train.keep_checkpoints)

    def load_checkpoint(self, path: Path) -> None:
        self.step, counters = load_checkpoint(self.acc, path)
        self.checkpoint = path
        self.resumed_metrics = counters.get("metrics")
        self.cache_uses = Counter({(shard, row): n for shard, row, n in counters.get("cache_uses", [])})
        log.info("resumed from %s at step %d", path, self.step)

    def save_backbone(self) -> None:
        if self.acc.is_main_process:
            backbone = self.acc.unwrap_model(self.model).backbone
            state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
            save_file(state, str(self.run_dir / BACKBONE_FILE))

    # ------------------------------------------------------------ training
    def batch_pairs(self, ids: np.ndarray, positions: np.ndarray, epoch: int, pairs: PairSource | None) -> BatchPairs:
        if pairs is None or not self.compose_views.pairing.at(epoch).uses_synthetic:
            # plain SSL (or the real phase of 'sequential'): two views of the real image
            return BatchPairs.real_only(self.real.images, ids)
        return pairs.get(ids, positions, epoch)

    def augment(self, batch: BatchPairs) -> Views:
        """The batch's float views (CPU) for the configured method and pairing (onlinemix/views/compose.py)."""
        return self.compose_views(batch.images, self.step // self.schedule.steps_per_epoch, self.step)

    def train_step(self, views: Views) -> float:
        tc = self.cfg.train
        views_on_device = views.to(self.acc.device, non_blocking=True)
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_with_warmup(self.step, self.total_steps, self.warmup_steps, self.base_lr, tc.final_lr)
        info = StepInfo(self.step, self.step // self.schedule.steps_per_epoch, self.total_steps)
        loss, self.last_logs = self.model(views_on_device, info)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step}; stopping before the weights are corrupted")
        self.optimizer.zero_grad(set_to_none=True)
        self.acc.backward(loss)
        if tc.clip_grad > 0:
            self.acc.clip_grad_norm_(self.model.parameters(), tc.clip_grad)
        self.method.after_backward(info)
        self.optimizer.step()
        self.method.after_step(info)
        return loss.item()

    def publish_aim(self, aim: AimPublisher, second: SecondViews) -> None:
        """Tell the producers what this step's pairs taught: the images' aim scores and noise levels."""
        similarity = self.method.pair_similarity
        aim.publish(second.ids, second.synthetic, second.uses, second.age,
                    None if similarity is None else similarity.cpu().numpy())

    def online_probes(self, epoch: int) -> dict[str, float]:
        """The kNN (every ``probe.knn_every`` epochs) and linear (``probe.linear_every``) monitors on
        held-out real images, on the main process."""
        pc = self.cfg.probe
        due = [name for name, every in (("knn", pc.knn_every), ("linear", pc.linear_every))
               if every and (epoch + 1) % every == 0]
        if not due or not self.acc.is_main_process:
            return {}
        # One feature pass serves both probes (no progress bar inside training's own).
        feats = extract_features(self.acc.unwrap_model(self.model).backbone, self.real.images, self.acc.device,
                                 desc=None, resolution=self.cfg.data.resolution)
        out = {}
        for name in due:
            result = (heldout_knn if name == "knn" else heldout_linear)(feats, self.real, pc)
            out.update({f"{name}_top1": result["top1"], f"{name}_top5": result["top5"]})
        return out

    def prepare(self, step: int, pairs: PairSource | None, port: TrainerPort | None,
                copy_stream: torch.cuda.Stream | None) -> Prepared:
        """Step ``step``'s input: its pairs (the ring slots go back once gathered), views, and the copy to
        the device. Runs on the input pipeline's thread, ahead of the training loop."""
        tc, spe = self.cfg.train, self.schedule.steps_per_epoch
        epoch = step // spe
        positions = self.schedule.rank_positions(step, self.acc.local_process_index, tc.batch_size)
        ids = self.schedule.ids_at(positions)
        with self.batch_pairs(ids, positions, epoch, pairs) as batch:
            if port is not None:  # every position of the node up to this batch's end has been asked for
                port.publish_position((step + 1) * self.schedule.node_batch)
        with torch.cuda.stream(copy_stream) if copy_stream is not None else nullcontext():
            views = self.compose_views(batch.images, epoch, step)  # a batched backend works on the device
        views, copied = to_device(views, self.acc.device, copy_stream)
        return Prepared(step, views, batch.stats, batch.from_cache, copied, batch.second)

    def fit(self, node: NodePairs, stop: threading.Event | None = None) -> tuple[RunMetrics, str | None]:
        """Train to ``train.epochs``; ``stop`` is the event the pair lookup's waits check (see prefetch.py).
        SIGINT or SIGTERM (on any rank) stops training after the current step, with a checkpoint. Returns
        the run's metrics (for its summary) and what stopped it, None when training ran to its end."""
        tc, acc = self.cfg.train, self.acc
        pairs, port, pool = node.source, node.port, node.pool
        spe, node_batch = self.schedule.steps_per_epoch, self.schedule.node_batch
        metrics = RunMetrics(self.run_dir / "metrics.jsonl" if acc.is_main_process else None, port, pool,
                             acc.log if acc.trackers else None)
        if self.resumed_metrics is not None:
            metrics.restore(self.resumed_metrics)
        if pairs is not None and pairs.cache is not None:
            pairs.cache.restore_uses(self.cache_uses)
        checkpoint_due = CheckpointSchedule(acc, tc.checkpoint_every, tc.checkpoint_every_s)
        aim = AimPublisher(port, self.cfg.generator) if port is not None and is_aimed(self.cfg.generator) else None
        if aim is not None and acc.is_main_process:
            log.info("generation aimed by the trainers: %s", aim.describe())
        stop_reason = None
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not acc.is_main_process,
                   desc="train", unit="step", dynamic_ncols=True)
        if port is not None:
            port.publish_position(self.step * node_batch)
        copy_stream = torch.cuda.Stream(acc.device) if acc.device.type == "cuda" else None
        pipeline = Prefetcher(lambda step: self.prepare(step, pairs, port, copy_stream), self.step, self.total_steps,
                              tc.prefetch, stop or threading.Event(), acc.device)
        # Signals are recorded until the last checkpoint is written: a repeated SIGTERM must not cut it short.
        with StopRequests() as stops:
            try:
                while self.step < self.total_steps:
                    epoch = self.step // spe
                    if pool is not None:
                        pool.check()
                    t0 = time.monotonic()
                    batch, data_wait_s = pipeline.next()
                    loss = self.train_step(batch.views)
                    if aim is not None and batch.second is not None:
                        self.publish_aim(aim, batch.second)
                    self.step += 1
                    self.cache_uses.update(batch.from_cache)
                    step_s = time.monotonic() - t0
                    if port is not None:
                        port.publish_speed(node_batch, step_s)
                    last = self.step == self.total_steps
                    metrics.record(self.step, epoch, batch.stats, data_wait_s, self.step % tc.log_every == 0 or last,
                                   loss=loss, lr=self.optimizer.param_groups[0]["lr"], step_s=step_s, **self.last_logs)
                    if self.step % spe == 0 or last:
                        metrics.end_epoch(epoch, **self.online_probes(epoch))
                    bar.set_postfix(metrics.postfix(loss), refresh=False)
                    bar.update()
                    save, stopping = checkpoint_due(self.step, stops.received is not None)
                    if stopping:
                        stop_reason = stops.received.name if stops.received else "a signal to another rank"
                        break
                    if save:
                        self.save_checkpoint(metrics)
                        checkpoint_due.saved()
            finally:
                pipeline.close()
                bar.close()
                metrics.close()
            if self.checkpoint != checkpoint_dir(self.run_dir, self.step):
                self.save_checkpoint(metrics)
        if stop_reason is not None:
            return metrics, stop_reason
        log.info("trained %d steps; second views: %s", self.step,
                 ", ".join(f"{metrics.totals[origin]} {origin}" for origin in ORIGINS))
        self.save_backbone()
        return metrics, None


def run(argv: list[str] | None = None) -> dict | None:
    """Parse, validate, train, probe. Returns the probe results on the main process."""
    args, overrides = parse_args(argv)
    cfg, resume = resolve_config(args, overrides)  # every config error surfaces here, before anything starts
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=chosen_tracker(cfg.report_to),
                              project_dir=cfg.output_dir,  # the tracker's directory: the run's (start_tracking)
                              kwargs_handlers=[InitProcessGroupKwargs(
                                  timeout=timedelta(seconds=cfg.train.collective_timeout_s))])
    synthetic = needs_synthetic_views(cfg)
    online = synthetic and not cfg.offline  # producers and a ring
    problem = unwritable_reason(Path(cfg.output_dir))
    if problem:  # before the cache check: the cache directory defaults to <output_dir>/cache
        raise ConfigError(f"output_dir {cfg.output_dir} cannot hold run directories ({problem}); set --output-dir "
                          "to a writable directory")
    devices = []
    if online:
        cfg.check_ring_capacity(local_world_size(accelerator))
        devices = producer_devices(NodeLaunch.detect(local_world_size(accelerator)), cfg.gen_gpus,
                                   cfg.producer_device_list())
        if cfg.cache.enabled:
            check_writable(cfg.cache_root())
    run_dir = make_run_dir(cfg, accelerator, resume[0] if resume else None)
    # One writer per run directory: a second run or --resume of it is refused while this one lives.
    with hold_run_dir(run_dir) if accelerator.is_main_process else nullcontext():
        setup_logging(accelerator, run_dir)
        stop_on_sigterm()
        if accelerator.device.type == "cpu":
            producers_here = devices.count("cpu")
            torch.set_num_threads(cfg.train.cpu_threads or max(1, ((os.cpu_count() or 1) - producers_here)
                                                                // accelerator.num_processes))
        if accelerator.is_main_process:
            log.info("run directory %s", run_dir)
        with accelerator.local_main_process_first():  # one process per node prepares a store the others then map
            real = load_real_images(cfg.data, cfg.store_root())
        cfg.check_dataset_size(len(select_train_ids(real, cfg.data)), accelerator.num_processes)
        trainer = Trainer(cfg, accelerator, run_dir, real)
        if resume is not None:
            checkpoint = resume[1]
            if checkpoint is None:
                newest = newest_checkpoint(run_dir)
                checkpoint = newest.path if newest is not None else None
            if checkpoint is not None:
                trainer.load_checkpoint(checkpoint)
            elif accelerator.is_main_process:  # a kill during the first save, or checkpoints deleted
                log.warning("--resume %s: no complete checkpoint in it: training it from step 0 with its saved "
                            "config%s", run_dir, set_aside_metrics(run_dir))
        finished_before = trainer.step >= trainer.total_steps  # a finished run resumed: its backbone, again
        stop = threading.Event()  # closes the input pipeline; the pair lookup's waits check it
        with ExitStack() as stack:
            node = NodePairs()
            if synthetic and trainer.step < trainer.total_steps:
                node = open_pairs(cfg, accelerator, run_dir, trainer.schedule, real, devices, stop, stack)
            if accelerator.is_main_process:  # training starts: the run directory is taken (make_run_dir)
                save_config(cfg, run_dir / "config.yaml")
            start_tracking(accelerator, cfg, run_dir)
            metrics, stop_reason = trainer.fit(node, stop)
            if finished_before:
                log.info("the run had already trained all %d steps: its backbone was written again from %s; "
                         "%s kept", trainer.total_steps, trainer.checkpoint, SUMMARY_FILE)
            elif accelerator.is_main_process:
                summary = {**metrics.summary(trainer.schedule.global_batch), "checkpoint": str(trainer.checkpoint)}
                write_json(run_dir / SUMMARY_FILE, summary)
                print(format_summary(summary), flush=True)
        accelerator.end_training()
        if stop_reason is not None:
            if accelerator.is_main_process:
                print(f"stopped by {stop_reason} at step {trainer.step} of {trainer.total_steps}, checkpoint saved; "
                      f"continue with: python -m onlinemix.train --resume {run_dir}", file=sys.stderr, flush=True)
            return None
        if not (cfg.probe.enabled and accelerator.is_main_process):
            return None
        backbone = accelerator.unwrap_model(trainer.model).backbone
        results = compare_with_random_init(backbone, cfg, accelerator.device, real)
        write_json(run_dir / "probe.json", results)
        print(format_probe(results), flush=True)
        if synthetic and cfg.generator.model == "stub":
            print("note: the stub diffuser has random weights, so its 'variations' carry no information about the\n"
                  "      image; this run exercises the system, not the method. --train.pairing real shows learning.",
                  flush=True)
        return results


def main(argv: list[str] | None = None) -> None:
    try:
        run(argv)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except (UserError, FileExistsError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:
        print(f"interrupted ({stopped_by(e).name}); producers stopped and shared memory released", file=sys.stderr)
        sys.exit(128 + stopped_by(e))


if __name__ == "__main__":
    main()
