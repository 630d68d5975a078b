"""What an installed (non-editable) package holds: the data files the code opens by package
resource, not by repository path — the paper's experiments, the paper's numbers, the toy pair."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_build_ships_every_data_file_the_code_opens(tmp_path):
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True)
    shipped = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    experiments = {p.relative_to(ROOT).as_posix() for p in (ROOT / "recipe/ta_opd/config/experiment").glob("*.yaml")}
    assert len(experiments) == 5 and experiments <= shipped, experiments - shipped
    assert {"recipe/ta_opd/config/ta_opd_trainer.yaml", "recipe/ta_opd/reproduce/paper_results.csv"} <= shipped
    toy = {p.relative_to(ROOT).as_posix() for p in (ROOT / "ta_opd/tools/toy/assets").rglob("*") if p.is_file()}
    assert toy and toy <= shipped, toy - shipped
