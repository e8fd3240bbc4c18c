import subprocess
import sys

import torch

from mate import cli


def test_check_on_cpu_passes(capsys):
    assert cli.main(["check", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "fmha.flash_attn_combine" in out and "reference" in out and "pass" in out
    assert "1 passed, 0 failed" in out or " 0 failed" in out


def test_show_config_prints_support_matrices(capsys):
    assert cli.main(["show-config"]) == 0
    out = capsys.readouterr().out
    assert "fmha.flash_attn_combine" in out and "head_dim" in out and "bfloat16" in out


def test_aot_lists_variants(capsys):
    assert cli.main(["aot", "--list", "--arch", "sm_90a"]) == 0
    out = capsys.readouterr().out
    assert "fmha.flash_attn_combine[head_dim=128,out_dtype=bfloat16]@cuda:sm_90a" in out


def test_aot_rejects_unknown_op(capsys):
    assert cli.main(["aot", "--op", "nope"]) == 2
    assert "names no op" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "mate", "env"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "MATE_LOGLEVEL" in result.stdout


def test_import_is_light():
    result = subprocess.run([sys.executable, "-c", "import sys, mate; print('tilelang' in sys.modules)"],
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
    assert torch.__version__
