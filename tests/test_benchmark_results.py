"""The benchmarks' shared result files: `--only` runs of listops.py / recall.py, at once in
several processes or one after another, fill one JSON without losing each other's entries,
and a run with other settings replaces the file instead of mixing with it."""

from __future__ import annotations

import json
import multiprocessing
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import common
import listops
import recall


def test_merge_entries_keeps_old_entries_when_settings_agree():
    old = {"settings": {"a": 1}, "runs": {"x": 1, "y": 2}}
    new = {"settings": {"a": 1}, "runs": {"y": 20, "z": 3}}
    merged = common.merge_entries(old, new, ("runs",), ("settings",))
    assert merged["runs"] == {"x": 1, "y": 20, "z": 3}  # new wins on y
    assert common.merge_entries(None, new, ("runs",), ("settings",)) is new


def test_merge_entries_replaces_when_settings_differ(capsys):
    old = {"settings": {"a": 1}, "runs": {"x": 1}}
    new = {"settings": {"a": 2}, "runs": {"z": 3}}
    assert common.merge_entries(old, new, ("runs",), ("settings",))["runs"] == {"z": 3}
    assert "settings differ" in capsys.readouterr().err


def _write_entries(path: str, name: str, times: int) -> None:
    for i in range(times):
        payload = {"settings": {"a": 1}, "runs": {name: i}}
        common.merge_json(Path(path), payload, lambda old, new: common.merge_entries(old, new, ("runs",), ("settings",)))


def test_merge_json_from_concurrent_processes(tmp_path):
    path = tmp_path / "result.json"
    names = ["p0", "p1", "p2", "p3"]
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    procs = [ctx.Process(target=_write_entries, args=(str(path), name, 5)) for name in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert json.loads(path.read_text())["runs"] == dict.fromkeys(names, 4)
    assert not list(tmp_path.glob("*.tmp"))  # every write was an atomic replace


def _listops_payload(name: str, *, data_examples: int = 100) -> dict:
    settings = {"dim": 8, "steps": 2, "mechanisms": {name: f"spec-{name}"}}
    return {"env": {"date": name}, "preset": "cpu", "mechanism_settings": {"window": 16, "seed": 0},
            "settings": settings, "data": {"train": {"examples": data_examples}},
            "runs": {name: {"name": name, "test_accuracy": 0.5}}}


def test_listops_runs_merge_in_table_order():
    order = ["dense", "linear", "lsh"]
    merged = listops.merge_runs(_listops_payload("lsh"), _listops_payload("dense"), order)
    merged = listops.merge_runs(merged, _listops_payload("linear"), order)
    assert list(merged["runs"]) == order
    assert merged["settings"]["mechanisms"] == {n: f"spec-{n}" for n in order}
    assert merged["settings"]["dim"] == 8


def test_listops_runs_on_other_data_replace_the_file(capsys):
    merged = listops.merge_runs(_listops_payload("dense", data_examples=50), _listops_payload("lsh"), ["dense", "lsh"])
    assert list(merged["runs"]) == ["lsh"] and list(merged["settings"]["mechanisms"]) == ["lsh"]
    assert "data differ" in capsys.readouterr().err


def _passkey_payload(name: str, steps: int = 10, seconds: float = 1.0) -> dict:
    return {"preset": "cpu", "task": "passkey", "settings": {"steps": steps, "dim": 8}, "lengths": [64],
            "depths": [0.5], "schedules": {name: "spec"}, "accuracy": {name: [1.0]},
            "digit_accuracy": {name: [1.0]}, "depth_accuracy": {name: [[1.0]]}, "reach": {name: [{}]},
            "training": {name: {"seconds": seconds}}, "seconds": seconds}


def test_recall_schedules_merge_and_resume(tmp_path):
    order = ["dense", "sliding_window", "linear"]
    merged = recall.merge_schedules(_passkey_payload("linear", seconds=2.0), _passkey_payload("dense"), order)
    assert list(merged["schedules"]) == ["dense", "linear"] and list(merged["accuracy"]) == ["dense", "linear"]
    assert merged["seconds"] == 3.0
    path = tmp_path / "passkey.json"
    path.write_text(json.dumps(merged))
    assert recall.finished_schedules(path, "cpu", {"steps": 10, "not_in_settings": 1}) == ["dense", "linear"]
    assert recall.finished_schedules(path, "cpu", {"steps": 11}) == []  # another run: nothing is kept
    assert recall.finished_schedules(path, "gpu", {"steps": 10}) == []
    assert recall.finished_schedules(tmp_path / "missing.json", "cpu", {}) == []


@pytest.mark.parametrize("other", [{"settings": {"steps": 99, "dim": 8}}, {"lengths": [128]}])
def test_recall_schedules_of_another_run_are_replaced(other):
    old = {**_passkey_payload("linear"), **other}
    merged = recall.merge_schedules(old, _passkey_payload("dense"), ["dense", "linear"])
    assert list(merged["schedules"]) == ["dense"] and merged["seconds"] == 1.0
