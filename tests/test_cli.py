"""What a new user meets first with the command-line tools: a test-only
data set, bad images found late, training offline, stopping with Ctrl-C or
SIGTERM, where the cache goes, reports that two runs agree on.

The data is a small synthetic benchmark of the built-in world (seed 0, 6
instances per category), so its split-1 test categories are novel for the
built-in checkpoint; every command runs in seconds on one CPU core.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from escape_fast import builtin
from escape_fast.data import EpisodeSampler, load_coco
from escape_fast.data.synthetic import generate
from escape_fast.files import remove_stale

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("ESCAPE_FAST_FIXTURE", ROOT.parent / "shared" / "data" / "mp100_fixture"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY_TRAIN = ["--backbone", "tiny", "--weights", "none", "--set", "input_size=64", "--set", "channels=16",
              "--set", "batch_size=8", "--set", "per_category=1", "--set", "workers=0", "--set", "alpha=0.5"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    generate(root, size="small", seed=0, progress=False, instances=6)
    return root


def _run(*args, env=ENV, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc, *needles):
    """Exit code 2 and a last stderr line that holds every needle, no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, last
    return last


def _corrupt_copy(bench: Path, dest: Path, mode: str) -> tuple[Path, int, int]:
    """A copy of split 1's ``mode`` annotations (and the images) in which one
    annotated image is cut in half: PIL opens it, decoding fails. Returns
    (root, its image id, its annotation id)."""
    (dest / "annotations").mkdir(parents=True)
    shutil.copytree(bench / "images", dest / "images")
    name = f"mp100_split1_{mode}.json"
    shutil.copy(bench / "annotations" / name, dest / "annotations" / name)
    coco = load_coco(dest / "annotations" / name)
    # the support of the first episode that eval --episodes 60 --queries 3 draws (training and the
    # figure read every instance): an instance the runs certainly read
    inst = coco.instances[EpisodeSampler(coco, shots=1, queries=3, draws=1, seed=0).episodes[0].supports[0]]
    path = Path(coco.images[inst.image_id].path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return dest, inst.image_id, inst.ann_id


# --------------------------------------------------------------------------
# your own test set
# --------------------------------------------------------------------------
def test_eval_needs_only_the_test_annotation_file(bench, tmp_path):
    (tmp_path / "annotations").mkdir()
    shutil.copy(bench / "annotations" / "mp100_split1_test.json", tmp_path / "annotations")
    (tmp_path / "images").symlink_to(bench / "images")
    proc = _run("escape_fast.eval", "--data", str(tmp_path), "--split", "1", "--episodes", "60", "--queries", "3",
                "--workers", "0", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PCK@0.2" in proc.stdout


# --------------------------------------------------------------------------
# data errors found late, in loader workers
# --------------------------------------------------------------------------
def test_corrupt_image_in_eval_is_one_line_or_skipped(bench, tmp_path):
    root, image_id, ann_id = _corrupt_copy(bench, tmp_path / "data", "test")
    args = ("escape_fast.eval", "--data", str(root), "--episodes", "60", "--queries", "3", "--workers", "2",
            "--quiet")
    _one_line_error(_run(*args), f"image id {image_id}", f"annotation id {ann_id}", "cannot decode")
    proc = _run(*args, "--bad-images", "skip")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped 1 instance(s) on 1 unreadable image(s)" in proc.stderr and "Traceback" not in proc.stderr


def test_corrupt_image_in_training_is_one_line_or_skipped(bench, tmp_path):
    root, image_id, ann_id = _corrupt_copy(bench, tmp_path / "data", "train")
    args = ("escape_fast.train", "--stage", "baseline", "--data", str(root), "--split", "1", *TINY_TRAIN,
            "--set", "baseline.epochs=1", "--set", "workers=2", "--set", "per_category=6")
    _one_line_error(_run(*args, "--out", str(tmp_path / "run")), f"image id {image_id}", f"annotation id {ann_id}")
    proc = _run(*args, "--out", str(tmp_path / "run2"), "--bad-images", "skip")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped 1 instance(s)" in proc.stderr and (tmp_path / "run2" / "baseline.pt").is_file()


def test_corrupt_image_in_plot_is_one_line(bench, tmp_path):
    root, image_id, ann_id = _corrupt_copy(bench, tmp_path / "data", "train")
    proc = _run("escape_fast.plot", "super-keypoints", "--annotations",
                str(root / "annotations" / "mp100_split1_train.json"), "--out", str(tmp_path / "map.png"), "--quiet")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"image id {image_id}" in proc.stderr and f"annotation id {ann_id}" in proc.stderr
    assert not (tmp_path / "map.png").exists()


# --------------------------------------------------------------------------
# training offline
# --------------------------------------------------------------------------
def test_training_offline_says_which_weights_are_missing(bench, tmp_path):
    # an empty torch.hub cache and a proxy that refuses every connection: this machine, offline
    env = {**ENV, "TORCH_HOME": str(tmp_path / "hub"), "https_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    start = time.monotonic()
    proc = _run("escape_fast.train", "--data", str(bench), "--split", "1", "--out", str(tmp_path / "run"), env=env)
    last = _one_line_error(proc, "resnet50", "ImageNet weights", "--weights none", "efficientnet_lite0")
    assert time.monotonic() - start < 60, last
    assert not (tmp_path / "run" / "baseline.pt").exists()


# --------------------------------------------------------------------------
# stopping: SIGINT (Ctrl-C) and SIGTERM, to the main process alone or to the group
# --------------------------------------------------------------------------
class _Output:
    """Collects a child's merged stdout/stderr in a thread (tqdm writes '\\r', not lines)."""

    def __init__(self, proc):
        self.text, self._proc = "", proc
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while True:
            chunk = os.read(self._proc.stdout.fileno(), 4096)
            if not chunk:
                return
            self.text += chunk.decode(errors="replace")

    def wait_for(self, needle: str, timeout: float = 120):
        end = time.monotonic() + timeout
        while needle not in self.text:
            assert self._proc.poll() is None, f"ended before {needle!r}:\n{self.text[-3000:]}"
            assert time.monotonic() < end, f"no {needle!r} after {timeout}s:\n{self.text[-3000:]}"
            time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(args, needle, signum, group, env=ENV, delay=1.0):
    """Start ``python -m args`` in its own process group, wait until ``needle``
    is printed (and ``delay`` more seconds), send ``signum`` to the main
    process or the whole group; returns (exit code, output, seconds to end)."""
    proc = subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    out = _Output(proc)
    try:
        out.wait_for(needle)
        time.sleep(delay)
        assert proc.poll() is None, f"finished before the signal:\n{out.text[-3000:]}"
        sent = time.monotonic()
        (os.killpg if group else os.kill)(proc.pid, signum)
        code = proc.wait(timeout=30)
        took = time.monotonic() - sent
        end = time.monotonic() + 10  # the workers follow their parent
        while _group_alive(proc.pid) and time.monotonic() < end:
            time.sleep(0.1)
        assert not _group_alive(proc.pid), "worker processes outlived the run"
    finally:
        if proc.poll() is None or _group_alive(proc.pid):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    time.sleep(0.2)
    return code, out.text, took


def _stopped_cleanly(code, text, took, signum):
    name = signal.Signals(signum).name
    assert code == 128 + signum, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert text.strip().splitlines()[-1].endswith(f"stopped by {name}"), text[-3000:]
    assert took < 15, took


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.startswith(".") or
                  p.name.endswith(".tmp"))


@pytest.mark.parametrize("signum,group", [(signal.SIGTERM, False), (signal.SIGINT, True)], ids=["term-main", "int-group"])
def test_stop_during_first_use_data_generation(tmp_path, signum, group):
    env = {**ENV, "ESCAPE_FAST_CACHE": str(tmp_path)}
    code, text, took = _stop(("escape_fast.eval", "--episodes", "300"), "generating the built-in", signum, group,
                             env=env, delay=2.0)
    _stopped_cleanly(code, text, took, signum)
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())  # no partial benchmark, no temporary folder


@pytest.mark.parametrize("signum,group", [(signal.SIGINT, False), (signal.SIGTERM, True)], ids=["int-main", "term-group"])
def test_stop_during_training(bench, tmp_path, signum, group):
    run = tmp_path / "run"
    args = ("escape_fast.train", "--stage", "baseline", "--data", str(bench), "--split", "1", "--out", str(run),
            *TINY_TRAIN, "--set", "baseline.epochs=500", "--set", "workers=2")
    code, text, took = _stop(args, "[baseline] epoch 2:", signum, group, delay=0.3)
    _stopped_cleanly(code, text, took, signum)
    assert _leftovers(run) == []
    from escape_fast import checkpoint

    assert checkpoint.load(run / "baseline.pt", kind="baseline")["epoch"] >= 2  # what was saved is whole
    proc = _run("escape_fast.train", "--stage", "baseline", "--data", str(bench), "--split", "1", "--out",
                str(run), *TINY_TRAIN, "--set", "baseline.epochs=3", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_stop_during_evaluation(bench, tmp_path):
    args = ("escape_fast.eval", "--data", str(bench), "--episodes", "60000", "--queries", "3", "--workers", "2",
            "--out", str(tmp_path / "report.json"))
    code, text, took = _stop(args, "categories", signal.SIGTERM, False, delay=0.5)
    _stopped_cleanly(code, text, took, signal.SIGTERM)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"MP-100 fixture not found at {FIXTURE}")
def test_stop_during_prediction(tmp_path):
    image = FIXTURE / "images" / "human_body" / "000000040083.jpg"
    queries = [str(image)] * 400
    args = ("escape_fast.predict", "--support", str(FIXTURE / "images" / "human_body" / "000000000785.jpg"),
            "--support-keypoints", str(FIXTURE / "annotations" / "fixture_all.json"), "--query", *queries,
            "--out", str(tmp_path / "out"), "--batch-size", "4")
    code, text, took = _stop(args, "", signal.SIGTERM, False, delay=6.0)
    _stopped_cleanly(code, text, took, signal.SIGTERM)
    assert not (tmp_path / "out" / "predictions.json").exists() and _leftovers(tmp_path) == []


def test_stop_during_a_figure(bench, tmp_path):
    args = ("escape_fast.plot", "super-keypoints", "--annotations",
            str(bench / "annotations" / "mp100_split1_train.json"), "--per-category", "1000",
            "--out", str(tmp_path / "map.png"))
    code, text, took = _stop(args, "base keypoint features", signal.SIGINT, True, delay=0.5)
    _stopped_cleanly(code, text, took, signal.SIGINT)
    assert list(tmp_path.iterdir()) == []


def test_stop_during_benchmark_generation(tmp_path):
    out = tmp_path / "synthetic"
    args = ("escape_fast.data.synthetic", "--out", str(out), "--workers", "2")
    code, text, took = _stop(args, "synthetic small", signal.SIGINT, True, delay=2.0)
    _stopped_cleanly(code, text, took, signal.SIGINT)
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_a_killed_run_are_removed_at_the_next_start(tmp_path, monkeypatch):
    monkeypatch.setenv("ESCAPE_FAST_CACHE", str(tmp_path))
    from escape_fast.data import synthetic

    name = f"synthetic-v{synthetic.VERSION}-small-seed0"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = tmp_path / f".{name}-{2**22 + 12345}-abc"  # above Linux's default pid_max: no such process
        live = tmp_path / f".{name}-{sleeper.pid}-abc"  # a generation still under way elsewhere
        for folder in (dead, live):
            folder.mkdir()
        (tmp_path / name).mkdir()
        (tmp_path / name / "COMPLETE").touch()
        with pytest.raises(builtin.CacheError):  # the marked cache is empty: damaged, but the check ran
            builtin.dataset_root(progress=False)
        assert not dead.exists() and live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale(tmp_path, f".{name}-") == [str(live)]


# --------------------------------------------------------------------------
# where things go, and reports
# --------------------------------------------------------------------------
def test_cache_folder_order(monkeypatch, tmp_path):
    monkeypatch.delenv("ESCAPE_FAST_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert builtin.cache_dir() == tmp_path / "home" / ".cache" / "escape_fast"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert builtin.cache_dir() == tmp_path / "xdg" / "escape_fast"
    monkeypatch.setenv("ESCAPE_FAST_CACHE", str(tmp_path / "mine"))
    assert builtin.cache_dir() == tmp_path / "mine"


def test_two_runs_of_one_evaluation_write_identical_results(bench, tmp_path):
    reports = []
    for name in ("a.json", "b.json"):
        proc = _run("escape_fast.eval", "--data", str(bench), "--episodes", "60", "--queries", "3", "--method",
                    "all", "--workers", "0", "--quiet", "--out", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports.append(json.loads((tmp_path / name).read_text()))
    a, b = reports
    assert a["results"] == b["results"] and a["differences"] == b["differences"]
    assert set(a["timing"]) >= {"setup_seconds", "device", "mle", "escape"}
    assert "seconds" in a["timing"]["mle"] and all("seconds" not in r for r in a["results"].values())


def test_five_splits_at_two_shot_counts_make_one_table(bench, tmp_path):
    from escape_fast import builtin

    for split in range(1, 6):  # a checkpoint per split, named by the {split} placeholder
        (tmp_path / f"split{split}.pt").symlink_to(builtin.checkpoint_path())
    out = tmp_path / "table.json"
    proc = _run("escape_fast.eval", "--data", str(bench), "--split", "all", "--shots", "1", "5", "--episodes", "40",
                "--queries", "1", "--method", "all", "--checkpoint", str(tmp_path / "split{split}.pt"),
                "--allow-base-categories", "--workers", "0", "--quiet", "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    runs, table = report["runs"], report["table"]
    assert [(r["split"], r["shots"]) for r in runs] == [(s, k) for s in range(1, 6) for k in (1, 5)]
    assert [Path(r["checkpoint"]).name for r in runs[::2]] == [f"split{s}.pt" for s in range(1, 6)]
    assert "0.05, 0.10, 0.15, 0.20, 0.25" in table["measures"]
    for method in ("MLE", "MAP", "ESCAPE"):
        row = table["rows"][f"{method} PCK@0.2"]
        for r in runs:
            assert row[f"split {r['split']}, {r['shots']}-shot"] == 100 * r["results"][method.lower()]["pck"]["0.20"]
        for k in (1, 5):
            mean = sum(row[f"split {s}, {k}-shot"] for s in range(1, 6)) / 5
            assert abs(table["means"][f"{method} PCK@0.2"][f"mean, {k}-shot"] - mean) < 1e-9
    md = (tmp_path / "table.md").read_text()
    assert md.splitlines()[2].startswith("| | split 1, 1-shot | split 1, 5-shot |") and "| ESCAPE mPCK |" in md
    assert md.strip() in proc.stdout
    # one split at one shot count writes the single report, as before
    single = _run("escape_fast.eval", "--data", str(bench), "--split", "2", "--episodes", "40", "--queries", "1",
                  "--allow-base-categories", "--workers", "0", "--quiet", "--out", str(tmp_path / "one.json"))
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["split"] == 2 and one["results"]["escape"] == runs[2]["results"]["escape"]
    bad = _run("escape_fast.eval", "--data", str(bench), "--split", "6", "--quiet")
    assert bad.returncode == 2 and "a split is 1..5 or all" in bad.stderr


def test_the_table_sets_the_authors_figures_beside_their_released_files():
    from escape_fast.eval.table import build_table, markdown

    def report(split, shots, pck):
        return {"split": split, "shots": shots, "episodes": 60000, "checkpoint": f"/w/escape_split{split}.pth",
                "results": {"escape": {"pck": {"0.20": pck}, "mpck": pck - 0.1}}}
    table = build_table([report(1, 1, 0.85), report(1, 5, 0.9), report(2, 1, 0.8), report(2, 5, 0.86)])
    theirs = table["rows"]["ESCAPE PCK@0.2, the authors' README (escape_splitN.pth)"]
    assert theirs == {"split 1, 1-shot": 85.98, "split 1, 5-shot": 91.19, "split 2, 1-shot": 82.72,
                      "split 2, 5-shot": 87.57}
    assert abs(table["means"]["ESCAPE PCK@0.2"]["mean, 1-shot"] - 82.5) < 1e-9
    assert "| ESCAPE PCK@0.2 | 85.00 | 90.00 | 80.00 | 86.00 | 82.50 | 88.00 |" in markdown(table)


def test_loader_workers_keep_quiet_when_the_main_process_leaves(capsys):
    """In a loader worker, the resource-sharer thread's errors when the
    stopping main process resets its connection print nothing (it reports
    them through sys.excepthook; other threads through threading.excepthook);
    any other error still prints."""
    import threading

    from escape_fast.data import dataset

    def fail(exc):
        raise exc

    old_sys, old_threading = sys.excepthook, threading.excepthook
    try:
        dataset._init_worker(0)
        for exc in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset"), ValueError("a real bug")):
            try:
                raise exc
            except (ConnectionError, ValueError):
                sys.excepthook(*sys.exc_info())
            t = threading.Thread(target=fail, args=(exc,))
            t.start()
            t.join()
    finally:
        sys.excepthook, threading.excepthook = old_sys, old_threading
    err = capsys.readouterr().err
    assert "BrokenPipeError" not in err and "ConnectionResetError" not in err
    assert err.count("ValueError: a real bug") == 2
