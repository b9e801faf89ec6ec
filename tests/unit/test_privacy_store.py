"""BudgetStore: per-job budgets on the device that survive restarts and never reset silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedkube.runtime.privacy import (
    BudgetFileError,
    BudgetStore,
    PrivacyAccountant,
    Step,
    compose_epsilon,
)

DELTA = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _round(accountant: PrivacyAccountant, steps: int = 20) -> None:
    accountant.record(noise_multiplier=1.1, sample_rate=0.05, steps=steps)


def test_nothing_saved_reads_as_none(tmp_path: Path) -> None:
    store = BudgetStore(tmp_path / "budgets")
    assert store.load("mnist") is None
    assert store.read("mnist") is None


def test_round_trip_keeps_history_mechanism_and_extra(tmp_path: Path) -> None:
    store = BudgetStore(tmp_path)
    accountant = PrivacyAccountant("prv")
    _round(accountant)
    accountant.record(noise_multiplier=0.9, sample_rate=0.1, steps=3)
    extra = {"noiseMultiplier": 1.1, "plannedSteps": 400, "delta": DELTA}
    store.save("mnist", accountant, extra=extra)

    record = store.read("mnist")
    assert record is not None
    assert record.accountant.mechanism == "prv"
    assert record.accountant.history == accountant.history
    assert record.extra == extra
    assert store.load("mnist").epsilon(DELTA) == accountant.epsilon(DELTA)


def test_a_restarted_agent_continues_from_its_persisted_epsilon(tmp_path: Path) -> None:
    before_restart = PrivacyAccountant("rdp")
    for _ in range(3):
        _round(before_restart)
        BudgetStore(tmp_path).save("team-a/mnist", before_restart, extra={"round": 3})
    spent_before = before_restart.epsilon(DELTA)

    # A new process: a new store object on the same folder, a new accountant from it.
    after_restart = BudgetStore(tmp_path).load("team-a/mnist")
    assert after_restart is not None
    assert after_restart.epsilon(DELTA) == spent_before
    _round(after_restart)
    BudgetStore(tmp_path).save("team-a/mnist", after_restart, extra={"round": 4})

    one_round = compose_epsilon([Step(1.1, 0.05, 20)], delta=DELTA, accountant="rdp")
    four_rounds = compose_epsilon([Step(1.1, 0.05, 80)], delta=DELTA, accountant="rdp")
    reloaded = BudgetStore(tmp_path).load("team-a/mnist")
    assert reloaded.epsilon(DELTA) == pytest.approx(four_rounds)
    assert reloaded.epsilon(DELTA) > spent_before > one_round


def test_jobs_are_kept_apart_and_names_cannot_escape_the_root(tmp_path: Path) -> None:
    store = BudgetStore(tmp_path / "budgets")
    names = ["ns/job", "ns_job", "../../etc/passwd", ".hidden", "ünïcode job"]
    for index, name in enumerate(names, start=1):
        accountant = PrivacyAccountant("rdp")
        _round(accountant, steps=index)
        store.save(name, accountant, extra={})
    paths = {store.path_for(name) for name in names}
    assert len(paths) == len(names)
    for path in paths:
        assert path.parent == tmp_path / "budgets"
        assert not path.name.startswith(".")
    for index, name in enumerate(names, start=1):
        assert store.load(name).total_steps == index
    assert not list((tmp_path / "budgets").glob("*.tmp"))
    with pytest.raises(ValueError, match="empty"):
        store.path_for("")


def test_a_failed_save_leaves_the_previous_budget(tmp_path: Path) -> None:
    store = BudgetStore(tmp_path)
    accountant = PrivacyAccountant("rdp")
    _round(accountant)
    store.save("job", accountant, extra={"ok": True})
    _round(accountant)
    with pytest.raises(TypeError):
        store.save("job", accountant, extra={"not json": object()})
    assert store.load("job").total_steps == 20
    assert sorted(path.name for path in tmp_path.iterdir()) == [store.path_for("job").name]


def test_overwriting_replaces_the_file(tmp_path: Path) -> None:
    store = BudgetStore(tmp_path)
    accountant = PrivacyAccountant("rdp")
    for steps in (1, 2, 3):
        _round(accountant, steps=steps)
        store.save("job", accountant, extra={"steps": accountant.total_steps})
    record = store.read("job")
    assert record.accountant.total_steps == 6
    assert record.extra == {"steps": 6}
    assert len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"version": 99}), "version 1"),
        (json.dumps({"version": 1, "job": "other", "extra": {}}), "belongs to job 'other'"),
        (
            json.dumps(
                {"version": 1, "job": "job", "extra": {}, "accountant": {"mechanism": "rdp"}}
            ),
            "missing keys",
        ),
    ],
)
def test_an_untrustworthy_file_raises_instead_of_resetting_the_budget(
    tmp_path: Path, content: str, message: str
) -> None:
    store = BudgetStore(tmp_path)
    store.path_for("job").write_text(content, encoding="utf-8")
    with pytest.raises(BudgetFileError, match=message):
        store.load("job")
