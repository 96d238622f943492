"""The image store: pixels against independent decodes, byte-identical stores across worker counts,
kills and sources, one shared copy in memory, constant opening cost, and every kind of bad input."""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from onlinemix.data.__main__ import main
from onlinemix.data.decode import load_image_folder
from onlinemix.data.prepare import PrepareError, Settings, pool_start_method, prepare
from onlinemix.data.sources import array_source
from onlinemix.data.store import ImageStore, StoreError, check_resolution, file_crc32, verify_store
from onlinemix.train import main as train_main

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------- helpers

def textured(width: int, height: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8: gradients plus noise, so a wrong resize, crop or channel order changes pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def jpeg_bytes(pixels: np.ndarray, quality: int = 92) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def photo_folder(root: Path, shapes: list[tuple[int, int]], classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    """JPEGs of the given (width, height), alternating between the classes."""
    for i, (w, h) in enumerate(shapes):
        (root / classes[i % len(classes)]).mkdir(parents=True, exist_ok=True)
        (root / classes[i % len(classes)] / f"{i:03d}.jpg").write_bytes(jpeg_bytes(textured(w, h, i)))
    return root


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A webdataset tar: each sample's fields as KEY.SUFFIX members, in order."""
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for suffix, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def store_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_data_command(*args: str, patch: str = "", preexec=None) -> subprocess.CompletedProcess:
    """``python -m onlinemix.data ARGS`` in a fresh process, after running ``patch`` there."""
    code = f"{patch}\nfrom onlinemix.data.__main__ import main\nmain({list(args)!r})"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=180, preexec_fn=preexec)


def random_store(root: Path, n: int, size: int, chunk_images: int = 0) -> ImageStore:
    pixels = np.random.default_rng(n).integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    source = array_source("synthetic", pixels, np.arange(n) % 3, ["a", "b", "c"], f"random-{n}")
    prepare(source, root, Settings(size=size, chunk_images=chunk_images), workers=1, progress=False)
    return ImageStore.open(root)


# ----------------------------------------------------------------------------- pixels

def expected_raw(path: Path, size: int) -> np.ndarray:
    """Decode, 16-bit grey to 8 bits, RGB, short side to ``size`` (bicubic), centre crop: (3, S, S)."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            img = Image.fromarray(np.clip(np.round(np.asarray(img, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8))
        rgb = img.convert("RGB")
    w, h = rgb.size
    new_w, new_h = max(size, round(w * size / min(w, h))), max(size, round(h * size / min(w, h)))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    resized = rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
    return np.asarray(resized.crop((left, top, left + size, top + size))).transpose(2, 0, 1)


def awkward_folder(root: Path) -> list[Path]:
    """Wide, tall, tiny, grey, RGBA, palette-with-transparency, CMYK and 16-bit images, in source order."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    files = [root / "a" / n for n in ("1_wide.jpg", "2_tall.png", "3_tiny.png", "4_grey.png")] + \
            [root / "b" / n for n in ("1_rgba.png", "2_palette.png", "3_cmyk.jpg", "4_sixteen.png")]
    files[0].write_bytes(jpeg_bytes(textured(90, 41, 0)))
    files[1].write_bytes(png_bytes(textured(31, 70, 1)))
    files[2].write_bytes(png_bytes(textured(10, 12, 2)))
    Image.fromarray(textured(40, 40, 3)[..., 0]).save(files[3])
    Image.fromarray(np.dstack([textured(50, 30, 4), np.full((30, 50), 128, np.uint8)])).save(files[4])
    palette = Image.fromarray(textured(33, 33, 5)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(files[5], transparency=0)
    Image.fromarray(textured(40, 52, 6)).convert("CMYK").save(files[6], quality=95)
    Image.fromarray((np.linspace(0, 65535, 36 * 36).reshape(36, 36)).astype(np.uint16)).save(files[7])
    return files


def test_raw_pixels_equal_an_independent_decode_resize_and_centre_crop(tmp_path: Path) -> None:
    files = awkward_folder(tmp_path / "src")
    assert Image.open(files[7]).mode == "I;16" and Image.open(files[6]).mode == "CMYK"
    prepare(str(tmp_path / "src"), tmp_path / "store", Settings(size=24, chunk_images=3), workers=1, progress=False)
    store = ImageStore.open(tmp_path / "store")
    assert (len(store), store.size, store.format, store.classes) == (8, 24, "raw", ["a", "b"])
    assert store.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    got = store.read(range(8))
    assert got.dtype == torch.uint8 and got.shape == (8, 3, 24, 24)
    for i, path in enumerate(files):
        assert np.array_equal(got[i].numpy(), expected_raw(path, 24)), path.name
    # The same pixels as the in-memory loader the trainer uses today, in the same order.
    assert torch.equal(got, load_image_folder(tmp_path / "src", 24)[0])
    # Random batches by id, into a caller's buffer.
    out = torch.empty((3, 3, 24, 24), dtype=torch.uint8)
    assert store.read([7, 0, 3], out=out) is out and torch.equal(out, got[[7, 0, 3]])


def test_image_folder_order_and_labels_are_the_in_memory_loaders(tmp_path: Path) -> None:
    """Nested directories whose names sort differently as strings than as paths ('x-y' < 'x/' as text)."""
    for i, rel in enumerate(["b/x/2.png", "b/x-y/1.png", "b/x.y/0.png", "b/x/y/3.png", "a/z.png", "a/A.png"]):
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / rel).write_bytes(png_bytes(textured(12 + i, 10, i)))
    prepare(str(tmp_path / "src"), tmp_path / "store", Settings(size=8), workers=1, progress=False)
    store = ImageStore.open(tmp_path / "store")
    images, labels, classes = load_image_folder(tmp_path / "src", 8)
    assert torch.equal(store.read(range(len(store))), images) and torch.equal(store.labels, labels)
    assert store.classes == classes == ["a", "b"]


def test_jpeg_store_pixels_equal_decoding_the_stored_bytes(tmp_path: Path) -> None:
    shapes = [(100, 60), (50, 90), (20, 16), (48, 48)]
    photo_folder(tmp_path / "src", shapes)
    prepare(str(tmp_path / "src"), tmp_path / "store", Settings(size=48, format="jpeg", quality=85, chunk_images=3),
            workers=1, progress=False)
    store = ImageStore.open(tmp_path / "store")
    assert store.format == "jpeg" and len(store) == 4
    index = np.load(tmp_path / "store" / "index.npy")  # the format, read without the reader
    sources = sorted((tmp_path / "src").rglob("*.jpg"), key=lambda p: (p.parent.name, p.name))
    variable, squares = store.read_variable(range(4)), store.read(range(4))
    reference_tables = Image.open(io.BytesIO(jpeg_bytes(textured(8, 8, 0), quality=85))).quantization
    for i, (chunk, offset, length) in enumerate(index.tolist()):
        stored = (tmp_path / "store" / "chunks" / f"{chunk:06d}.bin").read_bytes()[offset:offset + length]
        with Image.open(io.BytesIO(stored)) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.quantization == reference_tables  # quality 85
            decoded = np.asarray(img)
        assert np.array_equal(variable[i].permute(1, 2, 0).numpy(), decoded)
        # the longer side capped at S, aspect kept; small images untouched
        with Image.open(sources[i]) as src:
            w, h = src.size
            scale = min(1.0, 48 / max(w, h))
            assert decoded.shape[:2] == (round(h * scale), round(w * scale))
            reference = np.asarray(src.convert("RGB").resize((decoded.shape[1], decoded.shape[0]),
                                                             Image.Resampling.BICUBIC), dtype=np.float64)
        psnr = 10 * np.log10(255 ** 2 / np.mean((decoded - reference) ** 2))
        assert psnr > 25, f"image {i}: stored JPEG far from its source ({psnr:.1f} dB)"
        # read(): short side to S, centre crop, as RAW stores are squared
        tensor = torch.from_numpy(decoded.copy()).permute(2, 0, 1)
        new_h = max(48, round(tensor.shape[1] * 48 / min(tensor.shape[1:])))
        new_w = max(48, round(tensor.shape[2] * 48 / min(tensor.shape[1:])))
        if (new_h, new_w) != tuple(tensor.shape[1:]):
            tensor = TF.resize(tensor, [new_h, new_w], interpolation=InterpolationMode.BILINEAR, antialias=True)
        top, left = (new_h - 48) // 2, (new_w - 48) // 2
        assert torch.equal(squares[i], tensor[:, top:top + 48, left:left + 48])


def test_the_store_is_the_same_whatever_the_worker_count(tmp_path: Path) -> None:
    photo_folder(tmp_path / "src", [(60 + 7 * i, 40 + 5 * i) for i in range(10)])
    settings = Settings(size=32, format="jpeg", chunk_images=3)
    one = prepare(str(tmp_path / "src"), tmp_path / "one", settings, workers=1, progress=False)
    two = prepare(str(tmp_path / "src"), tmp_path / "two", settings, workers=2, progress=False)
    assert one.chunks == two.chunks == two.chunks_built == 4
    assert store_files(tmp_path / "one") == store_files(tmp_path / "two")


def test_webdataset_and_image_folder_sources_give_the_same_store(tmp_path: Path) -> None:
    pixels = [textured(30 + 3 * i, 26, i) for i in range(9)]
    labels = [0, 0, 0, 0, 0, 1, 1, 1, 1]
    for i, (image, label) in enumerate(zip(pixels, labels)):
        (tmp_path / "folder" / ["cat", "dog"][label]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "folder" / ["cat", "dog"][label] / f"{i:02d}.png").write_bytes(png_bytes(image))
    (tmp_path / "shards").mkdir()
    for shard, ids in enumerate((range(0, 4), range(4, 9))):
        write_shard(tmp_path / "shards" / f"s-{shard}.tar",
                    [(f"{i:06d}", {"png": png_bytes(pixels[i]), "cls": str(labels[i]).encode()}) for i in ids])
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    settings = Settings(size=20, chunk_images=4)
    prepare(str(tmp_path / "folder"), tmp_path / "from-folder", settings, workers=1, progress=False)
    prepare(str(tmp_path / "shards" / "s-{0..1}.tar"), tmp_path / "from-tars", settings, workers=1,
            classes_file=tmp_path / "classes.txt", progress=False)
    folder, tars = store_files(tmp_path / "from-folder"), store_files(tmp_path / "from-tars")
    headers = {k: json.loads(v.pop("store.json")) for k, v in (("folder", folder), ("tars", tars))}
    del folder["prepare.json"], tars["prepare.json"]
    assert folder == tars and len(folder) > 5  # every chunk, commit record and table, byte for byte
    assert headers["folder"]["source"]["kind"] == "imagefolder" and headers["tars"]["source"]["kind"] == "webdataset"
    assert {k: v for k, v in headers["folder"].items() if k != "source"} == \
           {k: v for k, v in headers["tars"].items() if k != "source"}


def test_webdataset_samples_without_an_image_or_a_class_are_skipped_with_a_line(tmp_path: Path) -> None:
    samples = [("000000", {"png": png_bytes(textured(20, 20, 0)), "cls": b"1"}),
               ("000001", {"txt": b"caption only", "cls": b"0"}),
               ("000002", {"png": png_bytes(textured(20, 20, 2))}),
               ("000003", {"png": png_bytes(textured(20, 20, 3)), "cls": b"7"}),
               ("000004", {"jpg": b"not a jpeg", "cls": b"0"})]
    write_shard(tmp_path / "s.tar", samples)
    (tmp_path / "classes.txt").write_text("a\nb\n")
    result = prepare(str(tmp_path / "s.tar"), tmp_path / "store", Settings(size=8), workers=1,
                     classes_file=tmp_path / "classes.txt", progress=False)
    assert (result.images, result.skipped) == (1, 4)
    report = dict(line.split("\t") for line in (tmp_path / "store" / "skipped.txt").read_text().splitlines())
    assert report == {"s.tar:000001": "no image (keys ['cls', 'txt'])", "s.tar:000002": "no integer cls",
                      "s.tar:000003": "cls 7 is not one of the 2 classes",
                      "s.tar:000004": "not an image, or a format Pillow cannot read"}
    store = ImageStore.open(tmp_path / "store")
    assert store.classes == ["a", "b"] and store.labels.tolist() == [1]


# ----------------------------------------------------------------------------- kills and resume

def kill_after_first_commit(sig: signal.Signals) -> str:
    """Code for a prepare process: once a chunk is committed, half-write the next chunk and get ``sig``."""
    return f"""
import os, signal
import onlinemix.data.prepare as p
write = p.write_parts_atomically
def write_then_stop(path, parts):
    if path.parent.name == "chunks" and any(path.parent.parent.joinpath("commits").glob("*.json")):
        data = b"".join(parts)
        path.with_name(f".{{path.name}}.{{os.uname().nodename}}-{{os.getpid()}}.tmp").write_bytes(data[:len(data) // 2])
        os.kill(os.getpid(), {int(sig)})
    write(path, parts)
p.write_parts_atomically = write_then_stop
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_killed_prepare_resumes_to_the_same_bytes_without_decoding_committed_chunks(
        tmp_path: Path, sig: signal.Signals) -> None:
    photo_folder(tmp_path / "src", [(40 + i, 36) for i in range(8)])
    args = (str(tmp_path / "src"), "--size", "16", "--chunk-images", "2", "--workers", "1")
    proc = run_data_command("prepare", *args, "--out", str(tmp_path / "store"), patch=kill_after_first_commit(sig))
    temporaries = list((tmp_path / "store").rglob(".*.tmp"))
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL and temporaries  # the half-written chunk is still there
    else:  # Ctrl-C: one line, exit 130, temporaries removed
        assert proc.returncode == 130 and not temporaries, proc.stderr
        assert proc.stderr.strip().splitlines() == ["onlinemix.data prepare: interrupted; the chunks committed so far "
                                                    "are kept: run the same command again to resume"]
    assert [p.name for p in (tmp_path / "store" / "commits").iterdir()] == ["000000.json"]
    with pytest.raises(StoreError, match="incomplete .*run prepare again to resume: python -m onlinemix.data prepare"):
        ImageStore.open(tmp_path / "store")
    first = (tmp_path / "store" / "chunks" / "000000.bin").stat()

    resumed = prepare(args[0], tmp_path / "store", Settings(size=16, chunk_images=2), workers=1, progress=False)
    assert (resumed.chunks_already, resumed.chunks_built, resumed.images) == (1, 3, 8)
    again = (tmp_path / "store" / "chunks" / "000000.bin").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not written again
    prepare(args[0], tmp_path / "whole", Settings(size=16, chunk_images=2), workers=1, progress=False)
    assert store_files(tmp_path / "store") == store_files(tmp_path / "whole")


def file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past the limit fail with EFBIG (a full disk, for one file)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return apply


def test_a_full_disk_stops_prepare_with_one_line_and_it_resumes_afterwards(tmp_path: Path) -> None:
    store = tmp_path / "store"
    args = ("prepare", "digits", "--out", str(store), "--size", "8", "--chunk-images", "64", "--workers", "1")
    # A 12 KiB chunk file does not fit under 4 KiB: nothing is committed, nothing half-written is left.
    proc = run_data_command(*args, preexec=file_size_limit(4096))
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert "the disk is full" in line and "chunks/000000.bin" in line and "run the same command again to resume" in line
    assert not list(store.rglob(".*.tmp")) and not list((store / "chunks").iterdir())
    # Under 20 KB every chunk commits, but the 43 KB index table of the finished store does not.
    proc = run_data_command(*args, preexec=file_size_limit(20_000))
    assert proc.returncode == 1 and "index.npy" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    committed = {p.name: p.stat().st_mtime_ns for p in (store / "commits").iterdir()}
    assert len(committed) == 29 and not (store / "store.json").exists() and not list(store.rglob(".*.tmp"))
    proc = run_data_command(*args)
    assert proc.returncode == 0 and "0 chunk(s) built, 29 kept from an earlier run" in proc.stdout, proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (store / "commits").iterdir()} == committed
    prepare("digits", tmp_path / "whole", Settings(size=8, chunk_images=64), workers=1, progress=False)
    assert store_files(store) == store_files(tmp_path / "whole")


# ----------------------------------------------------------------------------- sharing and opening

READER = """
import pickle, sys
import torch
from pathlib import Path
def anonymous_kib():
    return int(next(l for l in Path("/proc/self/smaps_rollup").read_text().splitlines()
                    if l.startswith("Anonymous:")).split()[1])
store = pickle.loads(bytes.fromhex(sys.argv[1]))
batch = torch.empty((64, 3, store.size, store.size), dtype=torch.uint8)  # reused, as a trainer's pinned buffer
store.read(range(64), out=batch)  # torch's lazy initialisation happens outside the measurement
before = anonymous_kib()
for start in range(64, len(store), 64):
    store.read(range(start, start + 64), out=batch)
print(anonymous_kib() - before, flush=True)
sys.stdin.readline()
"""


def store_mappings(pid: int, root: Path) -> dict[str, int]:
    """Rss, Pss, Shared_Clean and private bytes of a process's mappings of files under ``root``."""
    totals = dict.fromkeys(("Rss", "Pss", "Shared_Clean", "Private"), 0)
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:  # a mapping's header line
            inside = len(fields) >= 6 and fields[5].startswith(str(root))
        elif inside and fields[0].rstrip(":") in ("Rss", "Pss", "Shared_Clean"):
            totals[fields[0].rstrip(":")] += int(fields[1]) * 1024
        elif inside and fields[0] in ("Private_Clean:", "Private_Dirty:"):
            totals["Private"] += int(fields[1]) * 1024
    return totals


def test_four_reading_processes_share_one_copy_of_the_store(tmp_path: Path) -> None:
    store = random_store(tmp_path / "store", 1024, 64, chunk_images=300)  # 12 MiB in 4 chunk files
    data_bytes = store.header["data_bytes"]
    readers = [subprocess.Popen([sys.executable, "-c", READER, pickle.dumps(store).hex()], cwd=REPO, env=ENV,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        anonymous = [int(r.stdout.readline()) * 1024 for r in readers]  # each has read every image
        maps = [store_mappings(r.pid, tmp_path / "store") for r in readers]
    finally:
        for r in readers:
            r.communicate("\n", timeout=60)
    for m in maps:
        assert m["Rss"] >= 0.95 * data_bytes and m["Shared_Clean"] >= 0.95 * data_bytes, m
        assert m["Private"] <= 0.05 * data_bytes, m
    assert 0.9 * data_bytes <= sum(m["Pss"] for m in maps) <= 1.1 * data_bytes, maps  # one copy, split four ways
    assert max(anonymous) < 0.25 * data_bytes, anonymous  # nobody made a private copy


def test_opening_reads_the_header_only_whatever_the_number_of_images(tmp_path: Path) -> None:
    small = random_store(tmp_path / "small", 40, 8, chunk_images=16)
    large = random_store(tmp_path / "large", 4000, 8, chunk_images=16)
    assert (small.header["chunks"], large.header["chunks"]) == (3, 250)
    events: list[tuple[str, str]] = []
    recording = [False]
    sys.addaudithook(lambda event, args: recording[0] and event in ("open", "mmap.__new__")
                     and events.append((event, str(args[0]))))

    def work_to_open(root: Path) -> tuple[list, int, int]:
        events.clear()
        io_before = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        recording[0] = True
        store = ImageStore.open(root)
        n, classes, size = len(store), store.classes, store.size
        recording[0] = False
        io_after = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        assert (n, classes, size) == (len(np.load(root / "labels.npy")), ["a", "b", "c"], 8)
        return list(events), int(io_after["rchar"]) - int(io_before["rchar"]), \
            int(io_after["syscr"]) - int(io_before["syscr"])

    opened_small, bytes_small, calls_small = work_to_open(tmp_path / "small")
    opened_large, bytes_large, calls_large = work_to_open(tmp_path / "large")
    assert opened_small == [("open", str(tmp_path / "small" / "store.json"))]
    assert opened_large == [("open", str(tmp_path / "large" / "store.json"))]
    assert calls_small == calls_large and abs(bytes_small - bytes_large) <= 64 and bytes_large < 8192
    # and the large store serves any image once opened
    assert torch.equal(ImageStore.open(tmp_path / "large").read([3999])[0],
                       torch.from_numpy(np.random.default_rng(4000).integers(0, 256, (4000, 3, 8, 8),
                                                                             dtype=np.uint8)[3999]))


def test_the_store_pickles_as_its_path(tmp_path: Path) -> None:
    store = random_store(tmp_path / "store", 10, 8)
    store.read([1])
    data = pickle.dumps(store)
    assert len(data) < 300
    assert torch.equal(pickle.loads(data).read(range(10)), store.read(range(10)))
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        store.read([10])


# ----------------------------------------------------------------------------- bad input

UNREADABLE_LOCKED = """
import os
scandir = os.scandir
def refuse_locked(path="."):
    if os.fspath(path).endswith(os.sep + "locked"):
        raise PermissionError(13, "Permission denied", os.fspath(path))
    return scandir(path)
os.scandir = refuse_locked
"""


def test_bad_images_are_skipped_with_one_line_each_and_listed_in_the_store(tmp_path: Path) -> None:
    src = tmp_path / "src"
    awkward_folder(src)  # eight good images in every mode: converted, none skipped
    good = jpeg_bytes(textured(40, 30, 9))
    bad = {"corrupt.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2, "truncated.jpg": good[:len(good) // 2],
           "empty.png": b"", "text.jpg": b"this is not an image", "bomb.png": png_bytes(textured(120, 100, 8))}
    for name, data in bad.items():
        (src / "b" / name).write_bytes(data)
    (src / "b" / "notes.txt").write_text("not an image suffix: ignored, as onlinemix.data ignores it")
    (src / "b" / "locked").mkdir()
    (src / "b" / "locked" / "hidden.png").write_bytes(png_bytes(textured(20, 20, 10)))
    proc = run_data_command("prepare", str(src), "--out", str(tmp_path / "store"), "--size", "16",
                            "--max-pixels", "10000", "--workers", "1", patch=UNREADABLE_LOCKED)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 6 and all(line.startswith("skipped b/") for line in lines), lines  # nothing else
    reasons = dict(line.removeprefix("skipped ").split(": ", 1) for line in lines)
    assert "unreadable directory" in reasons["b/locked"] and "Permission denied" in reasons["b/locked"]
    assert "decompression bomb: 120 x 100 = 12000 pixels" in reasons["b/bomb.png"]
    assert reasons["b/empty.png"] == "empty file (0 bytes)"
    assert reasons["b/text.jpg"] == "not an image, or a format Pillow cannot read"
    assert reasons["b/truncated.jpg"].startswith("truncated")
    assert reasons["b/corrupt.jpg"]
    assert "8 images, 6 skipped" in proc.stdout
    report = (tmp_path / "store" / "skipped.txt").read_text().splitlines()
    assert sorted(report) == sorted(line.removeprefix("skipped ").replace(": ", "\t", 1) for line in lines)
    store = ImageStore.open(tmp_path / "store")
    assert len(store) == 8 and store.header["skipped"] == 6
    assert torch.equal(store.read(range(8)), load_image_folder(src, 16)[0][:8])  # the good ones, converted


def test_verify_names_a_corrupt_chunk_and_info_a_missing_one(tmp_path: Path, capsys) -> None:
    prepare("digits", tmp_path / "store", Settings(size=8, chunk_images=512), workers=1, progress=False)
    with pytest.raises(SystemExit) as exit_:
        main(["verify", str(tmp_path / "store")])
    assert exit_.value.code == 0 and "every chunk matches its CRC32" in capsys.readouterr().out
    chunk = tmp_path / "store" / "chunks" / "000001.bin"
    data = bytearray(chunk.read_bytes())
    data[1000] ^= 0x01
    chunk.write_bytes(bytes(data))
    assert len(verify_store(tmp_path / "store")) == 1
    with pytest.raises(SystemExit) as exit_:
        main(["verify", str(tmp_path / "store")])
    out = capsys.readouterr().out
    assert exit_.value.code == 1 and "bad chunk 1 (chunks/000001.bin, images 512..1023): CRC32" in out
    with chunk.open("r+b") as f:
        f.truncate(1000)
    with pytest.raises(StoreError, match="is damaged: .*000001.bin has 1000 bytes, expected 98304; run verify"):
        ImageStore.open(tmp_path / "store").read([600])
    (tmp_path / "store" / "chunks" / "000003.bin").unlink()
    with pytest.raises(SystemExit) as exit_:
        main(["info", str(tmp_path / "store")])
    out = capsys.readouterr().out
    assert exit_.value.code == 1 and "images       1797 in 10 classes" in out and "2 missing or of the wrong size: 1, 3" in out


@pytest.mark.parametrize("store_format", ["raw", "jpeg"])
def test_damaged_bytes_stop_a_reader_naming_the_store_and_chunk(store_format: str, tmp_path: Path) -> None:
    """A flipped byte used to train silently (RAW) or end in the JPEG decoder naming nothing; a training
    run on the store ends with the same one line."""
    store = tmp_path / "store"
    prepare("digits", store, Settings(size=8, chunk_images=512, format=store_format), workers=1, progress=False)
    ImageStore.open(store).read([600])
    chunk = store / "chunks" / "000001.bin"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x20
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=rf"image store {store} is damaged: {chunk} \(chunk 1\) has CRC32 [0-9a-f]{{8}}, "
                                         r"expected [0-9a-f]{8}; run verify"):
        ImageStore.open(store).read([600])
    ImageStore.open(store).read([10])  # the other chunks still read
    with pytest.raises(SystemExit) as e:
        train_main(["--data.dataset", str(store), "--data.resolution", "8", "--train.pairing", "real", "--gen-gpus", "0",
                    "--train.epochs", "1", "--output-dir", str(tmp_path / "runs"), "--probe.enabled", "false"])
    assert str(e.value.code).startswith(f"error: image store {store} is damaged: {chunk} (chunk 1)")


def test_a_jpeg_that_does_not_decode_is_named_with_its_store_and_chunk(tmp_path: Path) -> None:
    """Bytes that match their chunk's CRC32 (damaged before it was computed) but do not decode."""
    store = tmp_path / "store"
    prepare("digits", store, Settings(size=8, chunk_images=512, format="jpeg"), workers=1, progress=False)
    chunk, (_, offset, length) = store / "chunks" / "000001.bin", np.load(store / "index.npy")[600]
    data = bytearray(chunk.read_bytes())
    data[offset:offset + length] = b"\x00" * length
    chunk.write_bytes(bytes(data))
    table = np.load(store / "chunks.npy")
    table[1, 2] = file_crc32(chunk)
    np.save(store / "chunks.npy", table)
    with pytest.raises(StoreError, match=rf"image store {store}: an image of chunk\(s\) \[1\] does not decode"):
        ImageStore.open(store).read([600])


def test_a_store_of_a_newer_format_version_is_refused(tmp_path: Path, capsys) -> None:
    random_store(tmp_path / "store", 4, 8)
    header = json.loads((tmp_path / "store" / "store.json").read_text())
    (tmp_path / "store" / "store.json").write_text(json.dumps({**header, "format_version": 2}))
    with pytest.raises(StoreError, match="format version 2, newer than the version this onlinemix reads"):
        ImageStore.open(tmp_path / "store")
    with pytest.raises(SystemExit, match="onlinemix.data info: image store .* upgrade onlinemix"):
        main(["info", str(tmp_path / "store")])


def test_a_store_smaller_than_the_training_resolution_is_refused_with_the_fix(tmp_path: Path) -> None:
    store = random_store(tmp_path / "store", 4, 16)
    check_resolution(store, 16)
    with pytest.raises(StoreError, match="16 px, smaller than the training resolution 32: prepare a store with "
                                         "--size 32 or more"):
        check_resolution(store, 32)


def test_prepare_refuses_to_mix_settings_or_overwrite_other_files_and_confirms_a_finished_store(
        tmp_path: Path) -> None:
    done = prepare("digits", tmp_path / "store", Settings(size=8), workers=1, progress=False)
    again = prepare("digits", tmp_path / "store", Settings(size=8), workers=1, progress=False)
    assert again.already_complete and (again.images, again.data_bytes) == (done.images, done.data_bytes)
    with pytest.raises(PrepareError, match="was started by .*--size 8.*this command asks for .*--size 12"):
        prepare("digits", tmp_path / "store", Settings(size=12), workers=1, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("keep me")
    with pytest.raises(PrepareError, match="exists and is not an image store"):
        prepare("digits", tmp_path / "other", Settings(size=8), workers=1, progress=False)
    with pytest.raises(StoreError, match="not an image store"):
        ImageStore.open(tmp_path / "other")


def test_prepare_into_a_file_is_refused_with_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PrepareError, match=f"--out {blocker} cannot hold a store \\(it is a file, not a directory\\)"):
        prepare("digits", blocker, Settings(size=8), workers=1, progress=False)


def test_prepare_spawns_its_workers_once_a_process_group_is_up(tmp_path: Path) -> None:
    """A training run prepares its store after CUDA and NCCL started; a forked child of those can
    deadlock. A gloo group stands in for them here (CUDA cannot start without a GPU)."""
    assert pool_start_method() == "fork"
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                         world_size=1)
    try:
        assert pool_start_method() == "spawn"
        prepare(array_source("synthetic", np.zeros((40, 3, 8, 8), np.uint8), np.arange(40) % 2, ["a", "b"], "z"),
                tmp_path / "spawned", Settings(size=8, chunk_images=20), workers=2, progress=False)  # a pool
        assert ImageStore.open(tmp_path / "spawned").read([39]).sum() == 0
    finally:
        torch.distributed.destroy_process_group()
