"""The checkpoint and time-budget flags of the commands that train (`train`, `eval passkey|mqar|listops`):
--checkpoint-dir, --resume, --checkpoint-every, --checkpoint-minutes, --max-minutes, passed through to
sparse_attn.train.loop; a run stopped by its budget and resumed ends as an uninterrupted one."""

import json

import pytest
from sa_testing import run_cli

from sparse_attn.train import loop as loop_module

run = run_cli
TINY_TRAIN = ["train", "--layers", "2", "--dim", "32", "--heads", "2", "--seq-len", "32", "--batch", "4",
              "--eval-every", "3", "--eval-batches", "2", "--lr-warmup", "2", "--corpus-bytes", "50000",
              "--no-progress", "--mechanisms", "sliding_window:window=8", "--steps", "6"]


class Clock:
    """The loop's clock: every reading is 7 s after the previous one."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 7.0
        return self.now


def history(path):
    return [{k: v for k, v in h.items() if k != "elapsed_s"} for h in json.loads(path.read_text())["history"]]


def test_train_max_minutes_stops_then_resume_equals_a_straight_run(capsys, tmp_path, monkeypatch):
    code, out, err = run(capsys, *TINY_TRAIN, "--json", str(tmp_path / "straight.json"))
    assert code == 0, err
    monkeypatch.setattr(loop_module, "_now", Clock())
    ckpt_dir, js = tmp_path / "ckpt", tmp_path / "run.json"
    code, out, err = run(capsys, *TINY_TRAIN, "--checkpoint-dir", str(ckpt_dir), "--max-minutes", "1",
                         "--checkpoint-every", "1", "--json", str(js))
    assert code == 0, err
    assert "stopped at step" in out and "--max-minutes 1.0 ran out" in out
    record = json.loads(js.read_text())
    assert record["stopped_early"] and 0 < len(record["history"]) < 6
    assert (ckpt_dir / "train.pt").is_file()
    monkeypatch.undo()
    code, out, err = run(capsys, *TINY_TRAIN, "--checkpoint-dir", str(ckpt_dir), "--resume", "--json", str(js))
    assert code == 0, err
    assert f"resuming at step {len(record['history'])}" in out and "after 6 steps" in out
    assert history(js) == history(tmp_path / "straight.json")


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint-every", "2"], "--checkpoint-every needs --checkpoint FILE or --checkpoint-dir DIR"),
    (["--checkpoint-minutes", "2"], "--checkpoint-minutes needs --checkpoint FILE or --checkpoint-dir DIR"),
    (["--checkpoint", "a.pt", "--checkpoint-dir", "d"], "not both"),
    (["--max-minutes", "0"], "--max-minutes: expected a positive number, got 0.0"),
    (["--checkpoint-every", "x"], "--checkpoint-every: expected an int, got 'x'"),
])
def test_train_checkpoint_flag_errors(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *TINY_TRAIN, *argv)
    assert code == 2 and message in err, err


def test_eval_mqar_checkpoints_resume_and_errors(capsys, tmp_path):
    argv = ["eval", "mqar", "--mechanisms", "win=sliding_window:window=4", "--steps", "2", "--dim", "16", "--layers",
            "2", "--pairs", "2", "--seq-len", "32", "--no-progress", "--checkpoint-dir", str(tmp_path),
            "--checkpoint-every", "1"]
    code, first, err = run(capsys, *argv)
    assert code == 0, err
    assert (tmp_path / "mqar_win.pt").is_file()
    code, again, err = run(capsys, *argv, "--resume")  # trained already: the checkpoint's model is tested again
    assert code == 0, err
    assert first.split("training:")[0] == again.split("training:")[0]
    code, _, err = run(capsys, "eval", "passkey", "--resume", "--steps", "1", "--no-progress")
    assert code == 2 and "--resume needs --checkpoint-dir DIR" in err


def test_eval_listops_passes_the_flags_through(capsys, tmp_path, monkeypatch):
    # the loop's side is tested in tests/train/test_loop.py; here: the flags reach train_listops
    from sparse_attn.eval import listops_train

    class Called(Exception):
        pass

    def capture(mechanisms, **kw):
        raise Called(kw)

    monkeypatch.setattr(listops_train, "train_listops", capture)
    argv = ["eval", "listops", "--mechanisms", "win=sliding_window:window=8,causal=false", "--steps", "3",
            "--no-progress", "--checkpoint-dir", str(tmp_path), "--resume", "--checkpoint-every", "50",
            "--checkpoint-minutes", "2.5", "--max-minutes", "8.5"]
    with pytest.raises(Called) as called:
        run(capsys, *argv)
    kw = called.value.args[0]
    assert (kw["checkpoint"], kw["resume"], kw["checkpoint_every"], kw["checkpoint_minutes"], kw["max_minutes"]) == \
        (str(tmp_path), True, 50, 2.5, 8.5)
    code, _, err = run(capsys, *argv[:6], "--checkpoint-minutes", "3")
    assert code == 2 and "--checkpoint-minutes needs --checkpoint-dir DIR" in err
    code, _, err = run(capsys, *argv[:6], "--checkpoint", "a", "--checkpoint-dir", "b")
    assert code == 2 and "not both" in err
