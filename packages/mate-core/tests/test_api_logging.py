import json

import pytest
import torch

from mate import cli, replay
from mate.mha_interface import flash_attn_combine
from mate.testing.fmha import combine_inputs


def _inputs(seed=0):
    return combine_inputs(3, 2, 4, 2, 8, seed=seed)


@pytest.fixture
def logfile(tmp_path, monkeypatch):
    path = tmp_path / "mate.log"
    monkeypatch.setenv("MATE_LOGDEST", str(path))
    return path


@pytest.mark.parametrize("level, present, absent", [
    (1, ["[mate] fmha.flash_attn_combine"], ["out_partial:", "min="]),
    (3, ["out_partial: Tensor(shape=(3, 2, 4, 2, 8), dtype=float32, device=cpu", "out_dtype: torch.bfloat16"],
     ["min="]),
    (5, ["min=", "max=", "mean=", "nan=0", "inf=0"], []),
])
def test_log_levels(monkeypatch, logfile, level, present, absent):
    monkeypatch.setenv("MATE_LOGLEVEL", str(level))
    flash_attn_combine(*_inputs(), out_dtype=torch.bfloat16)
    text = logfile.read_text()
    for piece in present:
        assert piece in text
    for piece in absent:
        assert piece not in text


def test_level_zero_logs_nothing(monkeypatch, logfile):
    monkeypatch.setenv("MATE_LOGLEVEL", "0")
    flash_attn_combine(*_inputs())
    assert not logfile.exists()


def test_level_ten_dump_replays_bitwise(monkeypatch, tmp_path, logfile, capsys):
    monkeypatch.setenv("MATE_LOGLEVEL", "10")
    monkeypatch.setenv("MATE_DUMP_DIR", str(tmp_path / "dumps"))
    flash_attn_combine(*_inputs(1), out_dtype=torch.float16)
    flash_attn_combine(*_inputs(2))
    monkeypatch.setenv("MATE_LOGLEVEL", "0")
    folders = replay.dump_folders(tmp_path / "dumps")
    assert len(folders) == 2
    manifest = json.loads((folders[0] / "manifest.json").read_text())
    assert manifest["api"] == "fmha.flash_attn_combine"
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["inputs"]["args"][0]["shape"] == [3, 2, 4, 2, 8]
    assert [r.status for r in map(replay.replay, folders)] == ["bitwise", "bitwise"]
    assert cli.main(["replay", "--dir", str(tmp_path / "dumps")]) == 0
    assert "2 passed, 0 failed" in capsys.readouterr().out
    assert cli.main(["list-dumps", str(tmp_path / "dumps")]) == 0
    assert "fmha.flash_attn_combine" in capsys.readouterr().out


def test_replay_detects_a_different_result(monkeypatch, tmp_path, logfile):
    monkeypatch.setenv("MATE_LOGLEVEL", "10")
    monkeypatch.setenv("MATE_DUMP_DIR", str(tmp_path))
    flash_attn_combine(*_inputs())
    monkeypatch.setenv("MATE_LOGLEVEL", "0")
    folder = replay.dump_folders(tmp_path)[0]
    recorded = torch.load(folder / "outputs.pt")
    recorded["result"][0].add_(1.0)
    torch.save(recorded, folder / "outputs.pt")
    result = replay.replay(folder)
    assert result.status == "mismatch" and "max abs error" in result.detail


@pytest.mark.parametrize("damage", ["truncate inputs", "garbage manifest", "delete outputs"])
def test_corrupted_dump_reports_a_clear_error(monkeypatch, tmp_path, logfile, capsys, damage):
    monkeypatch.setenv("MATE_LOGLEVEL", "10")
    monkeypatch.setenv("MATE_DUMP_DIR", str(tmp_path))
    flash_attn_combine(*_inputs())
    monkeypatch.setenv("MATE_LOGLEVEL", "0")
    folder = replay.dump_folders(tmp_path)[0]
    if damage == "truncate inputs":
        data = (folder / "inputs.pt").read_bytes()
        (folder / "inputs.pt").write_bytes(data[: len(data) // 2])
        expected = "inputs.pt: cannot load"
    elif damage == "garbage manifest":
        (folder / "manifest.json").write_text("{not json")
        expected = "cannot read manifest.json"
    else:
        (folder / "outputs.pt").unlink()
        expected = "outputs.pt: cannot load"
    assert cli.main(["replay", "--dir", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "error" in out and expected in out and "Traceback" not in out


def test_a_raising_call_is_logged_and_dumped(monkeypatch, tmp_path, logfile):
    monkeypatch.setenv("MATE_LOGLEVEL", "10")
    monkeypatch.setenv("MATE_DUMP_DIR", str(tmp_path / "dumps"))
    out_partial, lse_partial = _inputs()
    with pytest.raises(TypeError):
        flash_attn_combine(out_partial.half(), lse_partial)
    assert "raised ArgumentTypeError" in logfile.read_text()
    folder = replay.dump_folders(tmp_path / "dumps")[0]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["error"]["type"] == "ArgumentTypeError"
    monkeypatch.setenv("MATE_LOGLEVEL", "0")
    assert replay.replay(folder).status == "raised"


def test_missing_dump_dir_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["replay", "--dir", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().out


def test_replay_checks_arguments_written_in_place(monkeypatch, tmp_path, logfile):
    monkeypatch.setenv("MATE_LOGLEVEL", "10")
    monkeypatch.setenv("MATE_DUMP_DIR", str(tmp_path))
    out = torch.empty(2, 4, 2, 8)
    flash_attn_combine(*_inputs(), out=out)
    monkeypatch.setenv("MATE_LOGLEVEL", "0")
    folder = replay.dump_folders(tmp_path)[0]
    assert replay.replay(folder).status == "bitwise"
    recorded = torch.load(folder / "outputs.pt")
    recorded["kwargs_after"]["out"][0, 0, 0, 0] += 1.0  # what the call wrote into `out`
    torch.save(recorded, folder / "outputs.pt")
    assert replay.replay(folder).status == "mismatch"
