"""What `fedkube run` decides about its output folder, and the CLI's user-error lines,
without starting anything: real checkpoints written by the coordinator's own code."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from fedkube.runtime import cli, wire
from fedkube.runtime.coordinator import checkpoint
from fedkube.runtime.local import RunFolderError, prepare_folder, with_clients
from fedkube.runtime.spec import ManifestError, parse_job


def _state(weights: dict[str, torch.Tensor], *, round_: int,
           final_status: dict | None = None) -> checkpoint.State:
    return checkpoint.State(
        weights=weights, round=round_, version=round_, history=[], best_accuracy=None,
        rounds_without_improvement=0, bytes_up=0, bytes_down=0,
        rng_state=random.Random(0).getstate(), noise_state=torch.Generator().get_state(),
        server_optimizer={}, accountant=None, final_status=final_status)


WEIGHTS = {"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}


def _job(**spec: object):
    return parse_job({"apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
                      "metadata": {"name": "j"}, "spec": {"model": "mlp", **spec}})


def test_an_empty_or_new_folder_starts(tmp_path: Path) -> None:
    assert prepare_folder(tmp_path / "new", "refuse", job_file="j.yaml").empty
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n')  # stopped before a checkpoint
    assert prepare_folder(tmp_path, "refuse", job_file="j.yaml").empty
    assert not (tmp_path / "metrics.jsonl").exists()


def test_an_unfinished_run_is_resumed_only_when_asked(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, _state(WEIGHTS, round_=3))
    with pytest.raises(RunFolderError, match=r"unfinished run \(3 rounds done\).*--resume"):
        prepare_folder(tmp_path, "refuse", job_file="j.yaml")
    state = prepare_folder(tmp_path, "resume", job_file="j.yaml")
    assert (state.rounds_done, state.finished) == (3, False)
    assert (tmp_path / checkpoint.CHECKPOINT).exists()


def test_a_finished_run_is_refused_until_fresh(tmp_path: Path) -> None:
    final = {"phase": "Succeeded", "message": "target accuracy reached in round 6"}
    checkpoint.save(tmp_path, _state(WEIGHTS, round_=6, final_status=final))
    for existing in ("refuse", "resume"):
        with pytest.raises(RunFolderError, match="finished run .Succeeded after 6 rounds.*--fresh"):
            prepare_folder(tmp_path, existing, job_file="j.yaml")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "agents").mkdir()
    assert prepare_folder(tmp_path, "fresh", job_file="j.yaml").empty
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # only the run's files


def test_a_checkpoint_of_another_model_names_the_tensor(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, _state(WEIGHTS, round_=1))
    other = wire.schema_of({"fc.weight": torch.zeros(5, 4), "fc.bias": torch.zeros(5)})
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"tensor 'fc.bias' is \[3\] float32, the job's model has \[5\]"):
        checkpoint.load(tmp_path, schema=other)
    (tmp_path / checkpoint.CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable checkpoint"):
        checkpoint.inspect(tmp_path)


def test_clients_override_is_checked_like_the_manifest() -> None:
    job = _job(clientsPerRound=4, simulation={"clients": 8})
    assert with_clients(job, None).spec.simulation.clients == 8
    assert with_clients(job, 5).spec.simulation.clients == 5
    with pytest.raises(ManifestError, match=r"^--clients 3: clientsPerRound \(4\) exceeds "
                       r"simulation.clients \(3\)$"):
        with_clients(job, 3)
    with pytest.raises(ManifestError, match="spec.simulation.clients: .* at least 1"):
        with_clients(_job(), None)


def test_flag_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", "job.yaml", "--clients", "0"])
    assert exited.value.code == cli.EXIT_BAD_INPUT
    assert capsys.readouterr().err.splitlines() == [
        "error: argument --clients: must be at least 1, got 0 (see `fedkube run --help`)"]


def test_every_flag_has_help() -> None:
    parser = cli.build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("run", "coordinator", "agent", "validate"):
        for action in subcommands[name]._actions:
            assert action.help, (name, action.option_strings or action.dest)


def test_user_errors_read_as_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError) as raised:
        missing.read_text()
    assert cli._user_error(raised.value) == f"{missing}: no such file"
    assert cli._user_error(checkpoint.CheckpointError("x: y")) == "x: y"
    assert cli._user_error(RuntimeError("a bug")) is None  # bugs keep their traceback
