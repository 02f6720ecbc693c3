"""Benchmark `tinygemma prepare` against a plain tiktoken loop and the tutorial's datasets.map approach.

    python bench/prepare.py [--input FOLDER] [--min-mb 50] [--workers N] [--repeat 3]

Input: a folder with TinyStories-train.txt / TinyStories-valid.txt; by default the sample in
$TINYSTORIES_DIR repeated until it is at least --min-mb MB. Each method runs in its own process. Peak
memory comes from one extra run per method, in which the parent samples the summed RSS and PSS of that
process and all its children (/proc, Linux) every 20 ms; the timed runs are not sampled.
Methods:
  ours-1, ours-N  tinygemma.data.prepare with 1 and N workers (ftfy repair on, sha256, atomic writes)
  plain-1         a single-process loop: strip, encode_ordinary, append 50256, write (the rate to scale)
  tutorial-N      the tutorial: load_dataset (Parquet, hub layout) + ds.map(encode_ordinary, num_proc=N)
                  + a memmap written shard by shard (1024 contiguous shards); no <|endoftext|>, no repair
CPU s = user + system time of the process and its workers; cores used = CPU s / seconds (below N
when other jobs share the machine). plain-1, ours-1 and ours-N report the median of --repeat runs (the
run with the median time; a 2-3 s run is noisy), the tutorial runs once. The machine's own ceiling for
N-way scaling is measured too: N plain-1 loops started at once, each rate over plain-1's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLE = Path(os.environ.get("TINYSTORIES_DIR", Path(__file__).resolve().parents[2] / "shared/data/tinystories"))
FILES = ("TinyStories-train.txt", "TinyStories-valid.txt")


def _stories(folder: Path) -> list[str]:
    out = []
    for name in FILES:
        text = (folder / name).read_text(encoding="utf-8")
        out += [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
    return out


def run_ours(folder: Path, out: Path, workers: int) -> dict:
    from tinygemma.data.config import PrepareConfig
    from tinygemma.data.prepare import prepare

    meta = prepare(PrepareConfig(source=str(folder), out=str(out), workers=workers, force=True))
    return {"tokens": sum(s["tokens"] for s in meta["splits"].values())}


def run_plain(folder: Path, out: Path, workers: int) -> dict:
    import numpy as np

    from tinygemma.tokenizer import Tokenizer

    enc = Tokenizer().enc
    tokens = 0
    for name, split in zip(FILES, ("train", "val"), strict=True):
        ids: list[int] = []
        for story in (folder / name).read_text(encoding="utf-8").split("<|endoftext|>"):
            story = story.strip()
            if story:
                ids += enc.encode_ordinary(story)
                ids.append(50256)
        np.array(ids, dtype=np.uint16).tofile(out / f"{split}.bin")
        tokens += len(ids)
    return {"tokens": tokens}


def _tutorial_process(example: dict) -> dict:
    from tinygemma.tokenizer import get_encoding

    ids = get_encoding().encode_ordinary(example["text"])
    return {"ids": ids, "len": len(ids)}


def run_tutorial(folder: Path, out: Path, workers: int) -> dict:
    import datasets
    import numpy as np

    ds = datasets.load_dataset(str(folder / "hub"), cache_dir=str(out / "cache"))
    tokenized = ds.map(_tutorial_process, remove_columns=["text"], desc="tokenizing", num_proc=workers)
    tokens = 0
    for split, dset in tokenized.items():
        arr_len = int(np.sum(dset["len"], dtype=np.uint64))
        arr = np.memmap(out / f"{split}.bin", dtype=np.uint16, mode="w+", shape=(arr_len,))
        idx, total_batches = 0, min(1024, len(dset))
        for batch_idx in range(total_batches):
            batch = dset.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format("numpy")
            arr_batch = np.concatenate(batch["ids"])
            arr[idx: idx + len(arr_batch)] = arr_batch
            idx += len(arr_batch)
        arr.flush()
        tokens += arr_len
    return {"tokens": tokens}


METHODS = {"ours": run_ours, "plain": run_plain, "tutorial": run_tutorial}


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (pool workers), user + system."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _tree_mem(pid: int) -> tuple[int, int]:
    """(summed RSS, summed PSS) in bytes of pid and its descendants. RSS counts pages shared by forked
    workers once per process; PSS splits them between the processes sharing them (the real total)."""
    rss = pss = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return rss, pss


def _child(method: str, folder: Path, workers: int, out: str) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--child", method, "--input", str(folder), "--workers", str(workers),
           "--out", out]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _result(method: str, proc: subprocess.Popen) -> dict:
    stdout = proc.stdout.read()
    if proc.wait():
        raise SystemExit(f"{method} failed (exit {proc.returncode})")
    return json.loads(stdout.strip().splitlines()[-1])


def measure(method: str, folder: Path, workers: int, nbytes: int, repeat: int = 1) -> dict:
    """Timing: the median of ``repeat`` runs left alone. Memory: one more run, sampled from outside
    (reading /proc/PID/smaps_rollup walks the page tables and slows a process with a large RSS)."""
    runs = sorted((_run_once(method, folder, workers) for _ in range(repeat)), key=lambda r: r["seconds"])
    res = runs[len(runs) // 2]
    peak_rss, peak_pss = _peak_memory(method, folder, workers)
    res.update(method=f"{method}-{workers}", peak_rss_mb=peak_rss / 1e6, peak_pss_mb=peak_pss / 1e6,
               mb_s=nbytes / 1e6 / res["seconds"], tokens_s=res["tokens"] / res["seconds"])
    return res


def _run_once(method: str, folder: Path, workers: int) -> dict:
    with tempfile.TemporaryDirectory(dir=folder) as out:
        return _result(method, _child(method, folder, workers, out))


def _peak_memory(method: str, folder: Path, workers: int) -> tuple[int, int]:
    with tempfile.TemporaryDirectory(dir=folder) as out:
        proc = _child(method, folder, workers, out)
        peak_rss = peak_pss = 0
        while proc.poll() is None:
            rss, pss = _tree_mem(proc.pid)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            time.sleep(0.02)
        _result(method, proc)
    return peak_rss, peak_pss


def concurrent_ceiling(folder: Path, copies: int, alone: dict, repeat: int) -> float:
    """Mean rate of ``copies`` plain-1 loops started together (median of ``repeat`` tries), over plain-1's
    rate alone: what N cores give N independent copies of the plain loop on this machine."""
    tries = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(dir=folder) as out:
            outs = [Path(out) / str(i) for i in range(copies)]
            for o in outs:
                o.mkdir()
            procs = [_child("plain", folder, 1, str(o)) for o in outs]
            rates = [(r := _result("plain", p))["tokens"] / r["seconds"] for p in procs]
        tries.append(sum(rates) / len(rates))
    return sorted(tries)[len(tries) // 2] / alone["tokens_s"]


def make_input(min_mb: float, root: Path) -> Path:
    folder = root / "input"
    folder.mkdir()
    data = {name: (SAMPLE / name).read_bytes() for name in FILES}
    reps = max(1, -(-int(min_mb * 1e6) // sum(map(len, data.values()))))
    for name, raw in data.items():
        (folder / name).write_bytes(raw * reps)
    return folder


def add_hub_layout(folder: Path) -> None:
    """The same stories as hub-style Parquet, for the tutorial's load_dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "hub" / "data").mkdir(parents=True)
    for name, split in zip(FILES, ("train", "validation"), strict=True):
        text = (folder / name).read_text(encoding="utf-8")
        stories = [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
        pq.write_table(pa.table({"text": stories}), folder / "hub" / "data" / f"{split}-00000-of-00001.parquet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, help="folder with TinyStories-train.txt/-valid.txt")
    ap.add_argument("--min-mb", type=float, default=50.0)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=3, help="runs of plain-1, ours-1, ours-N (median)")
    ap.add_argument("--child", choices=sorted(METHODS), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        c0, t0 = _cpu_seconds(), time.perf_counter()
        res = METHODS[args.child](args.input, args.out, args.workers)
        print(json.dumps({**res, "seconds": time.perf_counter() - t0, "cpu_s": _cpu_seconds() - c0}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.input or make_input(args.min_mb, Path(tmp))
        if not (folder / "hub").exists():
            add_hub_layout(folder)
        nbytes = sum((folder / n).stat().st_size for n in FILES)
        n = args.workers
        print(f"input: {folder} ({nbytes / 1e6:.1f} MB, {len(_stories(folder)):,} stories); "
              f"{os.cpu_count()} CPUs; N = {n}")
        rows = [measure(m, folder, w, nbytes, args.repeat if m != "tutorial" else 1)
                for m, w in (("plain", 1), ("ours", 1), ("ours", n), ("tutorial", n))]
        ceiling = concurrent_ceiling(folder, n, rows[0], args.repeat) if n > 1 else 1.0
    print(f"{'method':<12}{'seconds':>9}{'MB/s':>8}{'tokens/s':>12}{'CPU s':>8}{'cores used':>11}"
          f"{'peak RSS MB':>13}{'peak PSS MB':>13}")
    for r in rows:
        print(f"{r['method']:<12}{r['seconds']:>9.2f}{r['mb_s']:>8.2f}{r['tokens_s']:>12,.0f}{r['cpu_s']:>8.2f}"
              f"{r['cpu_s'] / r['seconds']:>11.2f}{r['peak_rss_mb']:>13.0f}{r['peak_pss_mb']:>13.0f}")
    by = {r["method"]: r for r in rows}
    plain, ours1, oursn, tut = by["plain-1"], by["ours-1"], by[f"ours-{n}"], by[f"tutorial-{n}"]
    print(f"ours-1 / plain-1:            {ours1['tokens_s'] / plain['tokens_s']:.2f}x")
    print(f"ours-{n} / ({n} x plain-1):     {oursn['tokens_s'] / (n * plain['tokens_s']):.2f} (target >= 0.9)")
    print(f"machine ceiling: {n} plain-1 loops at once each run at {ceiling:.2f} x plain-1 alone")
    print(f"ours-{n} / ours-1:              {oursn['tokens_s'] / ours1['tokens_s']:.2f}x")
    # Wall-clock rates depend on how much CPU other jobs leave; tokens per CPU-second do not. On an idle
    # machine (cores used = N) this ratio is the scaling efficiency vs N x plain-1.
    eff = (oursn["tokens"] / oursn["cpu_s"]) / (plain["tokens"] / plain["cpu_s"])
    print(f"tokens per CPU-second, ours-{n} / plain-1: {eff:.2f} (load-independent estimate of the ratio above)")
    print(f"CPU per token, ours-{n} / ours-1:  {oursn['cpu_s'] / ours1['cpu_s']:.2f} (parallel overhead; "
          f"'cores used' < {n} means other load took the rest)")
    print(f"ours-{n} / tutorial-{n}:         {tut['seconds'] / oursn['seconds']:.2f}x faster")
    print(f"peak memory ours-{n}: {oursn['peak_pss_mb']:.0f} MB PSS, {oursn['peak_rss_mb']:.0f} MB RSS summed over "
          f"the main process and workers (target < 1000)")


if __name__ == "__main__":
    main()
