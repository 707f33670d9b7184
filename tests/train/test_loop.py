"""sparse_attn.train.loop: the one training loop. A run interrupted (by a crash after a checkpoint
or by its time budget) and resumed equals the uninterrupted run bit for bit on the CPU; the
checkpoint schedule (steps, minutes, evaluations, budget); argument errors; and the three trainers
built on it (LM, passkey/MQAR, ListOps) give the numbers recorded before they moved onto it."""

import json
import math
from pathlib import Path

import pytest
import torch
from loop_baseline_configs import run_all

from sparse_attn.eval.listops_train import listops_mechanisms, train_listops
from sparse_attn.eval.recall import mqar_experiment
from sparse_attn.train import TrainLoop, adamw, read_checkpoint, warmup_cosine
from sparse_attn.train import loop as loop_module

BASELINE = Path(__file__).parent / "data" / "loop_baseline.json"
STEPS = 10


class FakeClock:
    """The loop's clock, advanced by hand: each training step 'takes' step_seconds."""

    def __init__(self, step_seconds: float):
        self.now, self.step_seconds = 0.0, step_seconds

    def __call__(self) -> float:
        return self.now


def slow_optimizer_steps(monkeypatch, seconds: float = 10) -> FakeClock:
    """The loop's clock, on which every optimizer step of any trainer 'takes' `seconds`."""
    clock = FakeClock(step_seconds=0)
    monkeypatch.setattr(loop_module, "_now", clock)
    original = loop_module.optimizer_step

    def slow_step(*a):
        clock.now += seconds
        return original(*a)

    monkeypatch.setattr(loop_module, "optimizer_step", slow_step)
    return clock


def make(tmp_path=None, name="run.pt", clock: FakeClock | None = None, **kw):
    """A small dropout MLP on a regression task: random batches per step, dropout from the
    running random state (no step_seed), so resuming needs the saved RNG states."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.3), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    target = torch.randn(6, 1)

    def batches(step):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        return x, x @ target

    def loss(model, batch):
        if clock is not None:
            clock.now += clock.step_seconds
        x, y = batch
        err = (model(x) - y).pow(2).mean()
        return err, {"noise": float(torch.rand(()))}  # a draw from the global RNG, recorded each step

    @torch.no_grad()
    def evaluate(model, step):
        x, y = batches(10_000)
        return {"val_loss": float((model(x) - y).pow(2).mean())}

    args = {"steps": STEPS, "batches": batches, "loss": loss, "evaluate": evaluate, "eval_every": 4, "progress": False,
            "lr": lambda step: warmup_cosine(step, lr=1e-2, min_lr=1e-3, warmup=2, steps=STEPS)}
    if tmp_path is not None:
        args["checkpoint"] = tmp_path / name
    args.update(kw)
    return model, TrainLoop(model, adamw(model, lr=1e-2, weight_decay=0.1), **args)


def without_times(history):
    return [{k: v for k, v in h.items() if k != "elapsed_s"} for h in history]


def assert_same_run(model_a, result_a, model_b, result_b):
    assert without_times(result_a.history) == without_times(result_b.history)
    a, b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_crash_and_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    model_a, loop_a = make(tmp_path, "a.pt")
    straight = loop_a.run()
    assert straight.finished and not straight.stopped_early and straight.step == STEPS
    assert [h["step"] for h in straight.history] == list(range(1, STEPS + 1))
    assert [h["step"] for h in straight.history if "val_loss" in h] == [4, 8, 10]

    save = loop_module.write_checkpoint

    class Crash(Exception):
        pass

    def save_then_crash(path, payload):
        save(path, payload)
        if payload["step"] == 3:
            raise Crash

    monkeypatch.setattr(loop_module, "write_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        make(tmp_path, "b.pt", checkpoint_every=3)[1].run()
    monkeypatch.undo()
    assert read_checkpoint(tmp_path / "b.pt")["step"] == 3
    torch.manual_seed(1234)  # whatever ran before the resume: the checkpoint's random state wins
    model_b, loop_b = make(tmp_path, "b.pt", resume=True)
    resumed = loop_b.run()
    assert resumed.resumed_from == 3 and resumed.finished
    assert_same_run(model_a, straight, model_b, resumed)


def test_time_budget_stops_cleanly_and_resumes_exactly(tmp_path, monkeypatch):
    model_a, loop_a = make()
    straight = loop_a.run()

    clock = FakeClock(step_seconds=10)
    monkeypatch.setattr(loop_module, "_now", clock)
    _, loop_b = make(tmp_path, clock=clock, max_minutes=0.75)  # 45 s: 4 steps of 10 s, not a 5th
    stopped = loop_b.run()
    assert stopped.stopped_early and not stopped.finished and stopped.step == 4
    assert read_checkpoint(tmp_path / "run.pt")["step"] == 4  # checkpointed where it stopped
    assert stopped.train_seconds == pytest.approx(40)

    model_c, loop_c = make(tmp_path, clock=clock, resume=True, max_minutes=0.75)
    second = loop_c.run()
    assert second.stopped_early and second.step == 8
    model_d, loop_d = make(tmp_path, clock=clock, resume=True)
    done = loop_d.run()
    assert done.finished and not done.stopped_early
    assert done.train_seconds == pytest.approx(STEPS * 10)  # summed over the three sessions
    assert_same_run(model_a, straight, model_d, done)


def test_checkpoints_every_steps_and_minutes(tmp_path, monkeypatch):
    written = []
    save = loop_module.write_checkpoint
    monkeypatch.setattr(loop_module, "write_checkpoint", lambda path, payload: (written.append(payload["step"]),
                                                                                  save(path, payload)))
    make(tmp_path, checkpoint_every=3, eval_every=None, evaluate=None)[1].run()
    assert written == [3, 6, 9, 10]  # and at the end
    written.clear()
    make(tmp_path, eval_every=None, evaluate=None)[1].run()
    assert written == [10]
    written.clear()
    clock = FakeClock(step_seconds=25)
    monkeypatch.setattr(loop_module, "_now", clock)
    # 60 s after the last checkpoint of any kind: step 3 (75 s), eval 4, step 7 (75 s after 4), eval 8, the end
    make(tmp_path, clock=clock, checkpoint_minutes=1)[1].run()
    assert written == [3, 4, 7, 8, 10]
    ckpt = read_checkpoint(tmp_path / "run.pt")
    assert ckpt["finished"] and set(ckpt["rng"]) >= {"torch", "python"}


def test_resume_of_a_finished_run_trains_nothing(tmp_path):
    model_a, loop_a = make(tmp_path)
    first = loop_a.run()
    model_b, loop_b = make(tmp_path, resume=True)
    again = loop_b.run()
    assert again.finished and again.history == first.history and again.checkpoints_written == 0
    assert_same_run(model_a, first, model_b, again)


def test_loop_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="resume needs checkpoint"):
        make(resume=True)
    with pytest.raises(ValueError, match="existing checkpoint"):
        make(tmp_path, "none.pt", resume=True)[1].run()
    with pytest.raises(ValueError, match="eval_every needs evaluate"):
        make(evaluate=None)
    with pytest.raises(ValueError, match="dtype"):
        make(dtype="float16")
    with pytest.raises(ValueError, match="max_minutes"):
        make(max_minutes=0)
    with pytest.raises(ValueError, match="checkpoint_every needs checkpoint"):
        make(checkpoint_every=2)
    with pytest.raises(TypeError, match="checkpoint_minutes"):
        make(tmp_path, checkpoint_minutes="5")
    with pytest.raises(ValueError, match="meta"):
        make(meta={"step": 3})
    torch.save({"step": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not written by"):
        make(tmp_path, "other.pt", resume=True)[1].run()


def test_listops_budget_stop_and_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    mechanisms = {k: listops_mechanisms(window=8, block=4)[k] for k in ("sliding_window", "linear")}
    args = {"train_examples": 80, "val_examples": 20, "test_examples": 20, "min_length": 10, "max_length": 30,
            "dim": 16, "layers": 1, "heads": 2, "mlp_ratio": 2.0, "batch": 8, "steps": 4, "lr": 3e-3, "warmup": 1,
            "weight_decay": 0.1, "eval_every": 2, "seed": 0, "progress": False, "data_cache": tmp_path / "data"}
    straight = train_listops(mechanisms, **args)
    slow_optimizer_steps(monkeypatch)  # every step 'takes' 10 s on the loop's clock
    first = train_listops(mechanisms, checkpoint=tmp_path / "ckpt", max_minutes=0.5, **args)  # 2 steps: 30 s less setup
    assert list(first.runs) == ["sliding_window"] and first.runs["sliding_window"].steps_done == 2
    assert math.isnan(first.runs["sliding_window"].test_accuracy)
    monkeypatch.undo()
    resumed = train_listops(mechanisms, checkpoint=tmp_path / "ckpt", resume=True, **args)
    for name in mechanisms:
        a, b = straight.runs[name], resumed.runs[name]
        assert without_times(a.history) == without_times(b.history)
        assert (a.test_accuracy, a.best_val_step, a.calls_per_step, b.steps_done) == \
            (b.test_accuracy, b.best_val_step, b.calls_per_step, 4)


def test_mqar_budget_stop_and_resume(tmp_path, monkeypatch):
    tiny = {"steps": 3, "dim": 16, "layers": 2, "heads": 2, "batch": 4, "test_examples": 4, "progress": False,
            "seq_len": 32, "vocab_size": 32}
    schedules = {"dense": "causal", "window": "sliding_window:window=4"}
    straight = mqar_experiment(schedules, [2, 4], **tiny)
    slow_optimizer_steps(monkeypatch)
    cut = mqar_experiment(schedules, [2, 4], checkpoint=tmp_path, max_minutes=0.4, **tiny)  # 24 s: 2 steps
    assert cut.unfinished == {"dense": 2, "window": 0} and cut.accuracy == {}
    monkeypatch.undo()
    resumed = mqar_experiment(schedules, [2, 4], checkpoint=tmp_path, resume=True, **tiny)
    assert resumed.unfinished == {} and resumed.accuracy == straight.accuracy
    for name in schedules:
        assert resumed.training[name]["loss_curve"] == straight.training[name]["loss_curve"]
    with pytest.raises(ValueError, match="need checkpoint"):
        mqar_experiment(schedules, [2, 4], resume=True, **tiny)


def _close(old, new, path=""):
    """Every number recorded in `old` is in `new` (new keys may be added), equal to 1e-6 relative
    (the runs were bit-identical on the machine that recorded them; the slack is for other BLAS)."""
    if isinstance(old, dict):
        assert isinstance(new, dict), path
        for key in old:
            assert key in new, f"{path}/{key} missing"
            _close(old[key], new[key], f"{path}/{key}")
    elif isinstance(old, list):
        assert isinstance(new, list) and len(old) == len(new), path
        for i, (a, b) in enumerate(zip(old, new)):
            _close(a, b, f"{path}[{i}]")
    elif isinstance(old, float):
        assert (math.isnan(old) and math.isnan(new)) or math.isclose(old, new, rel_tol=1e-6, abs_tol=1e-9), \
            f"{path}: {old} recorded, {new} now"
    else:
        assert old == new, f"{path}: {old!r} recorded, {new!r} now"


def test_trainers_give_the_numbers_recorded_before_the_loop(tmp_path):
    """tests/train/loop_baseline_configs.py ran on the code before train/loop.py existed wrote
    data/loop_baseline.json; the trainers on the loop must give the same histories and results."""
    recorded = json.loads(BASELINE.read_text())
    now = json.loads(json.dumps(run_all(cache=tmp_path)))
    _close(recorded, now)


def test_losses_and_tensor_metrics_are_read_back_together(tmp_path, monkeypatch):
    """Loss and 0-dim tensor metrics stay on the device during the steps and are read back in
    one go at evaluations, checkpoints and the end: the history holds the same floats as a
    per-step read would give."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    seen = []

    def loss(model, step_batch):
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(step_batch))
        err = model(x).pow(2).mean()
        seen.append((float(err.detach()), float(err.detach() * 2)))
        return err, {"double": (err * 2).detach(), "plain": 1.5}

    reads = []
    real = TrainLoop._read_back

    def counting(self):
        reads.append(sum(isinstance(v, torch.Tensor) for e in self._unread for v in e.values()))
        return real(self)

    monkeypatch.setattr(TrainLoop, "_read_back", counting)
    loop = TrainLoop(model, adamw(model, lr=1e-2, weight_decay=0.0), steps=7, batches=lambda s: s, loss=loss, lr=lambda s: 1e-2,
                     evaluate=lambda m, s: {"val": 0.0}, eval_every=5, progress=False, checkpoint=tmp_path / "c.pt",
                     checkpoint_every=3)
    history = loop.run().history
    assert [(h["train_loss"], h["double"]) for h in history] == pytest.approx(seen, rel=1e-6)
    assert all(type(h["train_loss"]) is float and type(h["double"]) is float and h["plain"] == 1.5 for h in history)
    # tensors read at step 3 (checkpoint: 3 steps x 2), step 5 (evaluation: 2 x 2), step 6 (checkpoint) and the end
    assert [n for n in reads if n] == [6, 4, 2, 2]
    assert read_checkpoint(tmp_path / "c.pt", "cpu")["history"] == history
