"""Training end to end: the default run shortened, resume, the learning check, clean exits."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, ring_segments, run_training, train_command
from PIL import Image
from safetensors.torch import load_file

from onlinemix import train as train_module
from onlinemix.core.cli import Terminated
from onlinemix.core.config import ConfigError
from onlinemix.evaluation.evaluate import main as eval_main
from onlinemix.train import run
from onlinemix.training.checkpoint import check_checkpoint
from onlinemix.training.rundir import CheckpointError

# 16 px and no per-epoch kNN: the same code paths at a quarter of the pixels.
FAST = ["--train.batch-size", "64", "--probe.epochs", "100", "--data.resolution", "16", "--probe.knn-every", "0"]
STEPS_PER_EPOCH = 1438 // 64  # bundled digits: 1,797 images, 20% held out for the probe


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metrics(run_dir: Path) -> list[dict]:
    """Step rows."""
    return [row for row in _rows(run_dir) if "step" in row]


def epoch_rows(run_dir: Path) -> list[dict]:
    return [row for row in _rows(run_dir) if "epoch_end" in row]


@pytest.mark.parametrize("where", ["repository", "elsewhere"])
def test_default_run_shortened_through_accelerate_launch(where: str, tmp_path: Path, no_leaked_segments) -> None:
    """The README's main command, started from the repository root and from another folder (the script's
    folder and the current one are first on sys.path: neither may shadow an installed package)."""
    proc = run_training("--train.epochs", "1", "--output-dir", str(tmp_path), "--run-name", "e2e", *FAST,
                        launcher="accelerate", cwd=REPO if where == "repository" else tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "e2e"
    for name in ("config.yaml", "metrics.jsonl", "backbone.safetensors", "probe.json", "train.log", "producer-0.log"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints" / f"step-{STEPS_PER_EPOCH}" / "model.safetensors").is_file()
    probe = json.loads((run_dir / "probe.json").read_text())
    assert 0 <= probe["trained"]["top1"] <= 100 and 0 <= probe["random_init"]["top1"] <= 100
    assert re.search(r"trained\s+\d+\.\d\d%", proc.stdout) and re.search(r"random_init\s+\d+\.\d\d%", proc.stdout)
    rows = metrics(run_dir)
    assert rows[-1]["step"] == STEPS_PER_EPOCH
    assert rows[-1]["total_fresh"] > 0, "no synthetic view reached the trainer"
    assert sum(rows[-1][f"total_{k}"] for k in ("fresh", "cached", "disk", "fallback")) == STEPS_PER_EPOCH * 64
    assert rows[-1]["checksum_errors"] == 0
    assert "attention" in (run_dir / "producer-0.log").read_text()


def test_resume_continues_from_the_saved_step(tmp_path: Path) -> None:
    common = ["--train.pairing", "real", "--gen-gpus", "0", "--output-dir", str(tmp_path), "--probe.enabled", "false",
              "--train.width", "8", *FAST]
    run([*common, "--train.epochs", "1", "--run-name", "r"])
    run_dir = tmp_path / "r"
    first = metrics(run_dir)
    saved = load_file(run_dir / "checkpoints" / f"step-{STEPS_PER_EPOCH}" / "model.safetensors")
    # Same number of epochs: nothing left to train, the weights must be exactly the checkpoint's.
    run(["--resume", str(run_dir)])
    backbone = load_file(run_dir / "backbone.safetensors")
    assert all((backbone[k] == saved[f"backbone.{k}"]).all() for k in backbone)
    assert len(metrics(run_dir)) == len(first)
    run(["--resume", str(run_dir), "--train.epochs", "2"])
    steps = [row["step"] for row in metrics(run_dir)]
    assert steps[: len(first)] == [row["step"] for row in first]
    assert steps[len(first)] > STEPS_PER_EPOCH and steps[-1] == 2 * STEPS_PER_EPOCH
    latest = run_dir / "checkpoints" / f"step-{2 * STEPS_PER_EPOCH}"
    assert latest.is_dir()
    # Cut short (a crash while saving): the file is named, and what to do.
    model = latest / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint file {model} cannot be read")) as e:
        run(["--resume", str(run_dir)])
    assert f"delete {latest} to resume from the checkpoint before it (step-{STEPS_PER_EPOCH})" in str(e.value)
    backbone = run_dir / "backbone.safetensors"
    backbone.write_bytes(backbone.read_bytes()[:1000])
    with pytest.raises(SystemExit) as e:
        eval_main([str(run_dir), "--probe-epochs", "1"])
    assert str(e.value.code).startswith(f"error: {backbone} cannot be read")
    assert f"`python -m onlinemix.train --resume {run_dir}` writes it again" in str(e.value.code)


def test_a_checkpoint_cut_short_names_its_file(tmp_path: Path) -> None:
    step = tmp_path / "checkpoints" / "step-5"
    step.mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"incomplete \(no COMPLETE marker: saving was cut short\); there is "
                                              r"no earlier checkpoint: start the run again"):
        check_checkpoint(step)
    (step / "COMPLETE").write_text('{"step": 5, "saved_at": 0}')
    torch.save({"state": torch.zeros(100)}, step / "optimizer.bin")
    check_checkpoint(step)
    (step / "optimizer.bin").write_bytes((step / "optimizer.bin").read_bytes()[:-30])
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint file {step / 'optimizer.bin'} cannot be read "
                                                        "(not a complete torch.save archive)")):
        check_checkpoint(step)


def test_a_run_directory_is_taken_when_training_starts_and_always_resumable(tmp_path: Path) -> None:
    """A dataset smaller than one batch stops the run with what to lower; the corrected run may use the
    same name (config.yaml is written only when training starts), and then the name is taken: --resume
    continues it, finished or without a complete checkpoint."""
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(20):  # 16 training images after the 20% hold-out
        (data / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / f"c{i % 2}" / f"{i}.png")
    common = ["--data.dataset", str(data), "--train.pairing", "real", "--gen-gpus", "0", "--output-dir", str(tmp_path),
              "--run-name", "r", "--probe.enabled", "false", "--train.width", "8", "--data.resolution", "16",
              "--train.epochs", "1"]
    with pytest.raises(ConfigError, match=r"16 training images .* lower train.batch_size to at most 16"):
        run(common)
    assert not (tmp_path / "r" / "config.yaml").exists()
    run([*common, "--train.batch-size", "8"])
    assert (tmp_path / "r" / "config.yaml").is_file()
    with pytest.raises(FileExistsError, match="already holds a run that started training; pick another run_name, "
                                              "or --resume it$"):
        run([*common, "--train.batch-size", "8"])

    # A finished run resumed writes its backbone again and keeps its summary (no 0-step summary over it).
    summary = (tmp_path / "r" / "summary.json").read_text()
    run(["--resume", str(tmp_path / "r")])
    assert (tmp_path / "r" / "summary.json").read_text() == summary

    # Without a complete checkpoint (a kill during the first save): --resume trains it from step 0, never
    # a loop of "start without --resume" and "--resume it".
    shutil.rmtree(tmp_path / "r" / "checkpoints")
    with pytest.raises(FileExistsError, match=r"it has no complete checkpoint: --resume trains it from step 0"):
        run([*common, "--train.batch-size", "8"])
    run(["--resume", "auto", "--output-dir", str(tmp_path), "--run-name", "r"])
    assert [json.loads(line)["step"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
            if '"step"' in line] == [2]  # log_every: the last step only
    assert len(list((tmp_path / "r").glob("metrics-before-*.jsonl"))) == 1  # the first attempt's rows, kept
    assert (tmp_path / "r" / "checkpoints" / "step-2" / "COMPLETE").is_file()


def test_an_unusable_output_directory_is_blamed_not_the_cache_below_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=re.escape(f"output_dir {blocker} cannot hold run directories (it is a file, "
                                                    "not a directory); set --output-dir to a writable directory")):
        run(["--output-dir", str(blocker)])


def test_plain_simclr_learns_better_features_than_random_init(tmp_path: Path) -> None:
    """A learning check independent of the stub diffuser: two augmented real views per image."""
    results = run(["--train.pairing", "real", "--gen-gpus", "0", "--train.epochs", "6", "--train.width", "16",
                   "--probe.linear-every", "3", "--output-dir", str(tmp_path), "--run-name", "learn"])
    assert results["trained"]["top1"] > results["random_init"]["top1"] + 2.0, results
    rows = epoch_rows(tmp_path / "learn")
    knn = [row["knn_top1"] for row in rows]  # the kNN monitor, once per epoch
    assert len(knn) == 6 and knn[-1] > 50.0, knn  # 10 classes: chance is 10%
    linear = [row.get("linear_top1") for row in rows]  # the online linear probe, every third epoch
    assert linear[:2] == [None, None] and linear[2] is not None
    assert linear[5] == results["trained"]["top1"]  # after the last epoch it is the end-of-run probe


def test_exception_in_the_trainer_stops_producers_and_frees_shared_memory(tmp_path: Path, monkeypatch,
                                                                          no_leaked_segments) -> None:
    def failing_step(self, *views):
        if self.step == 2:
            raise RuntimeError("injected failure")
        return original(self, *views)

    original = train_module.Trainer.train_step
    monkeypatch.setattr(train_module.Trainer, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="injected failure"):
        run(["--train.epochs", "1", "--output-dir", str(tmp_path), "--run-name", "boom", *FAST])
    assert not mp.active_children()


def test_exception_in_the_input_pipeline_stops_the_run_with_its_message(tmp_path: Path, monkeypatch,
                                                                        no_leaked_segments) -> None:
    """The pipeline thread makes batches ahead; its failure surfaces in the training loop, with the
    traceback of where it happened, and everything stops as for any trainer exception."""
    def failing_prepare(self, step, *args):
        if step == 3:
            raise ValueError("injected pipeline failure")
        return original(self, step, *args)

    original = train_module.Trainer.prepare
    monkeypatch.setattr(train_module.Trainer, "prepare", failing_prepare)
    with pytest.raises(ValueError, match="injected pipeline failure") as failure:
        run(["--train.epochs", "1", "--output-dir", str(tmp_path), "--run-name", "pipeline", *FAST])
    assert "failing_prepare" in [frame.name for frame in traceback.extract_tb(failure.value.__traceback__)]
    assert not mp.active_children()
    rows = metrics(tmp_path / "pipeline")
    assert all(row["step"] <= 3 for row in rows)


def _start(tmp_path: Path, name: str, *args: str, epochs: int = 5) -> subprocess.Popen:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.Popen(train_command("--train.epochs", str(epochs), "--output-dir", str(tmp_path),
                                          "--run-name", name, *FAST, *args), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _producer_pid(run_dir: Path) -> int:
    return int(re.findall(r"pid (\d+) started", (run_dir / "producer-0.log").read_text())[-1])


def _wait_for_training(run_dir: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)


def _live_pids() -> set[int]:
    """Every process that is not a zombie (an orphan's zombie may wait for a container's init to reap it)."""
    alive = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.add(int(stat.parent.name))
        except (OSError, IndexError):
            continue
    return alive


def _session_processes(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _assert_session_ends(sid: int, timeout: float = 20.0) -> None:
    """Every process of the job (producers, resource tracker) is gone shortly after the trainer."""
    deadline = time.monotonic() + timeout
    while (left := _session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ") for pid in left]


def test_ctrl_c_while_training_checkpoints_stops_every_process_and_frees_shared_memory(
        tmp_path: Path, no_leaked_segments) -> None:
    proc = _start(tmp_path, "interrupted")
    _wait_for_training(tmp_path / "interrupted", proc)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    step = int(re.search(r"stopped by SIGINT at step (\d+) of", stderr)[1])
    assert (tmp_path / "interrupted" / "checkpoints" / f"step-{step}" / "COMPLETE").is_file()
    assert f"continue with: python -m onlinemix.train --resume {tmp_path / 'interrupted'}" in stderr
    assert "Traceback" not in stderr
    _assert_session_ends(proc.pid)


def test_ctrl_c_while_producers_load_ends_without_their_tracebacks(tmp_path: Path, no_leaked_segments) -> None:
    """Workers ignore SIGINT from their first instruction: a Ctrl-C while they still import is not a
    KeyboardInterrupt traceback of theirs."""
    proc = _start(tmp_path, "loading")
    log = tmp_path / "loading" / "train.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and "waiting for 1 producer" in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    _assert_session_ends(proc.pid)


@pytest.mark.parametrize("stop,status", [(KeyboardInterrupt, 130), (Terminated, 143)])
def test_a_stopped_run_exits_with_128_plus_the_signal(stop: type, status: int, monkeypatch, capsys) -> None:
    def stopped(argv):
        raise stop()

    monkeypatch.setattr(train_module, "run", stopped)
    with pytest.raises(SystemExit) as e:
        train_module.main([])
    assert e.value.code == status
    assert f"interrupted (SIG{'INT' if status == 130 else 'TERM'})" in capsys.readouterr().err


def test_dead_producer_stops_the_job_cleanly_when_restarts_are_spent(tmp_path: Path, no_leaked_segments) -> None:
    before = ring_segments()
    proc = _start(tmp_path, "dead", "--producer.max-restarts", "0")
    _wait_for_training(tmp_path / "dead", proc)
    pid = _producer_pid(tmp_path / "dead")
    os.kill(pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert f"producer 0 (pid {pid}) died: killed by signal SIGKILL" in stderr
    assert "leaked semaphore" not in stderr  # the producer holds none (tqdm's lock is a thread lock there)
    assert ring_segments() == before
    _assert_session_ends(proc.pid)


def test_killed_producer_is_restarted_and_training_goes_on(tmp_path: Path, no_leaked_segments) -> None:
    run_dir = tmp_path / "restart"
    proc = _start(tmp_path, "restart", epochs=2)
    _wait_for_training(run_dir, proc)
    first = _producer_pid(run_dir)
    os.kill(first, signal.SIGKILL)  # wherever it is, mid-generation or mid-write
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"producer 0 (pid {first}) died: killed by signal SIGKILL; see its log producer-0.log; restarted" in stderr
    assert _producer_pid(run_dir) != first
    last = metrics(run_dir)[-1]
    assert last["producer_restarts"] == 1 and last["checksum_errors"] == 0
    assert last["step"] == 2 * STEPS_PER_EPOCH
    epochs = epoch_rows(run_dir)
    assert [row["epoch_end"] for row in epochs] == [0, 1]
    assert sum(row["fresh"] + row["cached"] + row["disk"] + row["fallback"] for row in epochs) == 2 * STEPS_PER_EPOCH * 64


def test_killed_job_leaves_nothing_the_next_run_does_not_clean(tmp_path: Path, no_leaked_segments) -> None:
    """SIGKILL of every process of a job (no cleanup code runs), then a new run starts."""
    proc = _start(tmp_path, "killed")
    _wait_for_training(tmp_path / "killed", proc)
    ring_name = next(tmp_path.glob("killed/.ring-*")).read_text()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    _assert_session_ends(proc.pid)
    after = run_training("--train.epochs", "1", "--staleness.policy", "real", "--output-dir", str(tmp_path),
                         "--run-name", "next", *FAST)
    assert after.returncode == 0, after.stderr[-3000:]
    assert ring_name not in ring_segments()


def test_producers_exit_when_the_trainer_is_killed(tmp_path: Path, no_leaked_segments) -> None:
    proc = _start(tmp_path, "orphans")
    _wait_for_training(tmp_path / "orphans", proc)
    producer = _producer_pid(tmp_path / "orphans")
    os.kill(proc.pid, signal.SIGKILL)  # only the trainer: its producers must notice and exit
    proc.communicate(timeout=60)
    _assert_session_ends(proc.pid)
    assert producer not in _live_pids()


def test_two_trainer_ranks_share_one_ring(tmp_path: Path, no_leaked_segments) -> None:
    """torchrun with two gloo ranks: the second rank attaches to the ring by name and trains (a run of two
    seconds: its batches wait for their views, which the default never does, so that pairs reach both ranks)."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "onlinemix.train",
         "--staleness.policy", "wait",
         "--train.epochs", "1", "--train.batch-size", "32", "--probe.epochs", "50", "--data.resolution", "16",
         "--probe.knn-every", "0", "--output-dir", str(tmp_path), "--run-name", "ddp"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(tmp_path / "ddp")
    assert rows[-1]["step"] == 1438 // 64  # global batch 2 x 32
    assert rows[-1]["total_fresh"] > 0
    assert (tmp_path / "ddp" / "probe.json").is_file()


def _trainer_ranks(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of torchrun's workers (they run in sessions of their own)."""
    ranks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != launcher_pid:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        for var in environ:
            if var.startswith(b"RANK="):
                ranks[int(var[5:])] = int(stat.parent.name)
    return ranks


def test_death_of_one_trainer_rank_stops_the_whole_job_cleanly(tmp_path: Path, no_leaked_segments) -> None:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "onlinemix.train",
         "--train.epochs", "5", "--train.batch-size", "32", "--data.resolution", "16", "--output-dir", str(tmp_path),
         "--run-name", "ddp"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_training(tmp_path / "ddp", proc)
        ranks = _trainer_ranks(proc.pid)
        assert sorted(ranks) == [0, 1]
        job = set(ranks.values()) | {_producer_pid(tmp_path / "ddp")}
        os.kill(ranks[1], signal.SIGKILL)
        proc.communicate(timeout=120)
        assert proc.returncode != 0
        deadline = time.monotonic() + 20
        while job & _live_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not job & _live_pids()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def test_an_image_folder_run_prepares_a_store_and_every_process_reads_it(tmp_path: Path, no_leaked_segments) -> None:
    """An ImageFolder dataset: the run prepares a store once under the cache directory; the trainer
    and the producer read it by id at the stored size (larger than the views), and so does the cache.
    Six steps in all: batches wait for their views (the default never does), so that pairs reach them."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "tree" / f"class{c}").mkdir(parents=True)
        for i in range(24):
            Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "tree" / f"class{c}" / f"{i}.png")
    proc = run_training("--data.dataset", str(tmp_path / "tree"), "--data.stored-size", "24", "--train.epochs", "2",
                        "--train.batch-size", "16", "--generator.batch-size", "8", "--ring.slots", "64",
                        "--probe.epochs", "20", "--data.resolution", "16", "--probe.knn-every", "0",
                        "--staleness.policy", "wait", "--output-dir", str(tmp_path), "--run-name", "folder")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stores = list((tmp_path / "cache" / "stores").iterdir())
    assert len(stores) == 1 and json.loads((stores[0] / "store.json").read_text())["size"] == 24
    rows = metrics(tmp_path / "folder")
    assert rows[-1]["total_fresh"] > 0, "no synthetic view reached the trainer"
    assert (tmp_path / "folder" / "probe.json").is_file()
    from onlinemix.cache import cache_keys

    described = list(cache_keys(tmp_path / "cache").values())
    assert [d["resolution"] for d in described] == [24]  # pairs cached at the stored size, not the view size


def _file_size_limit(limit: int) -> None:
    """A disk that fills up, for one process: writes past ``limit`` bytes fail with EFBIG (not SIGXFSZ)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_checkpoint_that_does_not_fit_ends_the_run_with_one_line(tmp_path: Path) -> None:
    """The model's 1 MB do not fit under the limit: one line naming the checkpoint and what survives,
    and the partial checkpoint's space given back (it was a SafetensorError traceback)."""
    args = ["--train.pairing", "real", "--gen-gpus", "0", "--train.epochs", "1", "--probe.enabled", "false",
            "--report-to", "none", "--output-dir", str(tmp_path), "--run-name", "full", *FAST]
    proc = subprocess.run(train_command(*args), capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "TQDM_DISABLE": "1"}, preexec_fn=lambda: _file_size_limit(500_000))
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"error: cannot write checkpoint {tmp_path / 'full' / 'checkpoints' / f'step-{STEPS_PER_EPOCH}'} "
                    f"(File too large); no earlier checkpoint exists; free space for {tmp_path / 'full'}, then "
                    "--resume it"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert list((tmp_path / "full" / "checkpoints").iterdir()) == []
