import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_readme_tables_are_generated_from_the_code():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gen-readme"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
