from dataclasses import dataclass
from typing import Literal

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.params import ParamError, apply_overrides, load_params, parse_override, section
from stages.common import ExecutionConfig
from stages.config import require


@dataclass(frozen=True)
class Demo:
    iterations: int = 10
    lr: float = 0.5
    mode: Literal["a", "b"] = "a"
    names: tuple[str, ...] = ()
    path: str | None = None

    def validate(self) -> None:
        require(self.iterations > 0, "iterations", self.iterations, "an integer > 0")


def test_defaults_and_overrides():
    params = apply_overrides({"demo": {"iterations": 3}}, {"demo.lr": 0.1, "demo.mode": "b"})
    cfg = section(params, "demo", Demo)
    assert (cfg.iterations, cfg.lr, cfg.mode) == (3, 0.1, "b")
    assert section({}, "demo", Demo) == Demo()


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"iterations": "ten"}, "demo.iterations: got 'ten', expected an integer"),
        ({"iterations": 0}, "demo.iterations: got 0, expected an integer > 0"),
        ({"mode": "c"}, "demo.mode: got 'c', expected one of 'a', 'b'"),
        ({"itrations": 5}, "demo.itrations"),
        ({"names": "x"}, "demo.names: got 'x', expected a list"),
    ],
)
def test_bad_values_name_key_value_and_expectation(raw, fragment):
    with pytest.raises(ParamError) as err:
        section({"demo": raw}, "demo", Demo)
    assert fragment in str(err.value)


def test_execution_device_checked():
    with pytest.raises(ParamError, match="execution.device: got 'tpu'"):
        section({"execution": {"device": "tpu"}}, "execution", ExecutionConfig)


def test_params_file_errors(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ParamError, match="mapping at the top level"):
        load_params(bad)
    assert load_params(tmp_path / "missing.yaml") == {}
    assert parse_override("train.iterations=20") == ("train.iterations", 20)
    with pytest.raises(ParamError):
        parse_override("no-equals")


def test_cli_help_lists_usage():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "DeltaEdit" in result.output


def test_python_dash_m_pipeline_is_the_deltaedit_command():
    """Where the `deltaedit` script is not on PATH (a GPU box with PYTHONPATH set)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "world", "train", "--help"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--only" in done.stdout
