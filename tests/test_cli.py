"""The real command line, end to end, and its handling of bad input."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch", reason="its extra is not installed")
pytest.importorskip("llama_cpp", reason="its extra is not installed")


def assert_clean_failure(result, *words):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr and "fix:" in result.stderr
    for word in words:
        assert word in result.stderr


def test_convert_then_eval_end_to_end(cli, tiny_model, tmp_path):
    out = tmp_path / "q4"
    done = cli("convert", str(tiny_model), "--to", "gguf:q4_k_m", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert (out / "model.gguf").is_file() and (out / "edgequant.json").is_file()
    again = cli("convert", str(tiny_model), "--to", "gguf:q4_k_m", "-o", str(out), env={"EDGEQUANT_QUIET": "0"})
    assert again.returncode == 0 and "cache hit" in again.stderr
    result = cli("eval", str(out), "--ctx", "64", "--windows", "2", "--repeats", "1", "--gen-tokens", "8",
                 "--prompt-tokens", "16", "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["target"] == "gguf:q4_k_m" and metrics["decode_tps"] > 0
    table = cli("eval", str(out), "--ctx", "64", "--windows", "2", "--no-speed")
    assert "baseline perplexity" in table.stdout and "top-1" in table.stdout and "95% interval" in table.stdout


def test_inspect_json_and_table(cli, tiny_model):
    result = cli("inspect", str(tiny_model), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["layers"] == 2
    table = cli("inspect", str(tiny_model))
    assert "gguf:q4_k_m" in table.stdout and "LlamaForCausalLM" in table.stdout


def test_several_specs_go_to_subfolders(cli, tiny_model, tmp_path):
    result = cli("convert", str(tiny_model), "--to", "gguf:q8_0,gguf:q4_0", "-o", str(tmp_path / "many"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["gguf-q4_0", "gguf-q8_0"]


def test_missing_model(cli, tmp_path):
    assert_clean_failure(cli("inspect", str(tmp_path / "missing")), "no such file")


def test_unknown_spec_fails_before_any_work(cli, tiny_model, tmp_path):
    result = cli("convert", str(tiny_model), "--to", "gguf:q8_0,gguf:q7_x", "-o", str(tmp_path / "x"))
    assert_clean_failure(result, "unknown precision", "q4_k_m")
    assert not (tmp_path / "x").exists()


def test_unwritable_output(cli, tiny_model):
    # /proc refuses new folders even to root, unlike a chmod-ed folder
    assert_clean_failure(cli("convert", str(tiny_model), "--to", "gguf:q8_0", "-o", "/proc/edgequant-out"), "cannot write")


def test_output_path_that_is_a_file(cli, tiny_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_clean_failure(cli("convert", str(tiny_model), "--to", "gguf:q8_0", "-o", str(blocker / "out")), "cannot")


def test_eval_of_a_folder_that_is_not_an_artifact(cli, tmp_path):
    assert_clean_failure(cli("eval", str(tmp_path)), "not a Hugging Face model folder")


def test_corrupt_gguf_on_the_command_line(cli, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    assert_clean_failure(cli("inspect", str(bad)), "GGUF")


def test_an_unexpected_exception_gives_a_short_error_and_a_crash_log(tmp_path):
    """A bug (here: a verb that divides by zero) never shows the user a traceback or its internal
    text: one error line, a crash log holding the traceback, exit 70."""
    code = ("import edgequant.commands.hardware as verb; from edgequant.cli import main\n"
            "verb.run = lambda args: 1 / 0\nraise SystemExit(main(['hardware']))")
    env = {k: v for k, v in os.environ.items() if k != "EDGEQUANT_DEBUG"} | {"EDGEQUANT_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 70 and "Traceback" not in done.stderr and "division by zero" not in done.stderr
    assert "unexpected ZeroDivisionError" in done.stderr and "fix: report it with" in done.stderr
    log = next((tmp_path / "logs").glob("crash-*.log")).read_text()
    assert "ZeroDivisionError: division by zero" in log and "Traceback" in log


def test_a_reader_that_goes_away_is_not_an_error(tmp_path):
    """`edgequant ... | head`: the pipe closes under a verb still printing; exit 0, nothing on stderr.
    (BrokenPipeError is an OSError: the disk-full handler must not swallow it first.)"""
    code = ("import edgequant.commands.hardware as verb; from edgequant.cli import main\n"
            "verb.run = lambda args: [print('x' * 1000) for _ in range(10000)] and 0\nraise SystemExit(main(['hardware']))")
    env = {k: v for k, v in os.environ.items() if k != "EDGEQUANT_DEBUG"} | {"EDGEQUANT_HOME": str(tmp_path)}
    reader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    reader.stdout.close()
    assert reader.wait(timeout=120) == 0 and reader.stderr.read() == b""
