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


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"storage_retries": -1}, "execution.storage_retries: got -1"),
        ({"storage_retries": 1.5}, "execution.storage_retries: got 1.5"),
        ({"storage_backoff_s": -0.1}, "execution.storage_backoff_s: got -0.1"),
        ({"worker_resources": {"GPU": 0}}, "execution.worker_resources: got {'GPU': 0}"),
        ({"storage_options": {"deltaedit_retry": {}}}, "execution.storage_options"),
    ],
)
def test_execution_retries_and_resources_checked(raw, fragment):
    with pytest.raises(ParamError) as info:
        section({"execution": raw}, "execution", ExecutionConfig)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_execution_storage_carries_the_retry_policy_to_every_worker():
    from store.fs import RetryPolicy, options_for, retry_policy

    ex = section(
        {"execution": {"storage_options": {"anon": True}, "storage_retries": 2}},
        "execution",
        ExecutionConfig,
    )
    so = ex.storage()
    assert retry_policy(so) == RetryPolicy(2, 0.2)
    assert options_for("s3://b/k", so) == {"anon": True}  # fsspec never sees the policy
    assert ex.storage_options == {"anon": True}
    assert ex.model_resources() == {}


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
