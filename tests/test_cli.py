"""The `jaxserve` command: one-line errors (traceback only at DEBUG), --log-level anywhere,
timestamped logs without third-party noise, --version, and vLLM's flag names."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from jaxserve import cli
from jaxserve.engine_flags import add_engine_args, engine_args_from


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("jaxserve ")


def test_typo_path_is_one_line_no_such_directory(capsys, tmp_path):
    missing = str(tmp_path / "no-such-model")
    assert cli.main(["generate", missing, "hi"]) == 1
    err = capsys.readouterr().err
    assert "no such directory" in err and missing in err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [
        f"jaxserve generate: error: model: no such directory: {missing!r}"]


def test_log_level_after_subcommand_and_traceback_at_debug(capsys, tmp_path):
    assert cli.main(["generate", str(tmp_path / "x"), "hi", "--log-level", "DEBUG"]) == 1
    assert "Traceback" in capsys.readouterr().err  # the traceback, at DEBUG only
    parse = cli.build_parser().parse_args
    assert parse(["generate", "m", "hi", "--log-level", "DEBUG"]).log_level == "DEBUG"
    assert parse(["--log-level", "ERROR", "serve", "m"]).log_level == "ERROR"
    assert parse(["serve", "m"]).log_level == "INFO"
    assert cli.main(["--log-level", "WARNING", "generate", str(tmp_path / "x"), "hi"]) == 1
    assert logging.getLogger().level == logging.WARNING


def test_logging_has_timestamps_and_silences_noise():
    cli.configure_logging("INFO")
    handler = logging.getLogger().handlers[0]
    assert "%(asctime)s" in handler.formatter._fmt
    assert logging.getLogger("absl").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("jax._src.xla_bridge").getEffectiveLevel() == logging.WARNING
    cli.configure_logging("DEBUG")
    assert logging.getLogger("absl").getEffectiveLevel() == logging.DEBUG
    with pytest.raises(ValueError, match="--log-level"):
        cli.configure_logging("LOUD")


def test_convert_onto_its_source_is_refused(capsys, tiny_checkpoints, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoints("LlamaForCausalLM"), src)
    before = sorted(p.name for p in src.iterdir())
    assert cli.main(["convert", str(src), str(src)]) == 1
    assert "source checkpoint itself" in capsys.readouterr().err
    assert sorted(p.name for p in src.iterdir()) == before


def test_gpt2_config_is_an_unsupported_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_head": 12,
        "n_embd": 768, "n_layer": 12, "vocab_size": 50257}))
    assert cli.main(["generate", str(tmp_path), "hi"]) == 1
    err = capsys.readouterr().err
    assert "'GPT2LMHeadModel' is not supported" in err and "LlamaForCausalLM" in err


def _engine_args(*flags: str):
    import argparse

    return engine_args_from(add_engine_args(argparse.ArgumentParser()).parse_args(list(flags)),
                            "m")


def test_vllm_engine_flags():
    args = _engine_args("--dtype", "half", "--gpu-memory-utilization", "0.5",
                        "--max-logprobs", "7", "--tokenizer", "tok", "--chat-template", "t.jinja",
                        "--generation-config", "vllm", "--enforce-eager",
                        "--max-n-sequences", "3", "--kv-cache-dtype", "fp8")
    assert (args.dtype, args.kv_cache_memory_fraction, args.max_logprobs) == ("half", 0.5, 7)
    assert (args.tokenizer, args.chat_template, args.generation_config) == (
        "tok", "t.jinja", "vllm")
    assert args.enforce_eager and args.request_limits.max_n == 3 and args.kv_cache_dtype == "fp8"
    with pytest.raises(ValueError, match="trust_remote_code"):
        _engine_args("--trust-remote-code")
    with pytest.raises(ValueError, match="max_model_len: must be >= 1"):
        _engine_args("--max-model-len", "0")
    with pytest.raises(ValueError, match="num_kv_blocks: must be >= 2"):
        _engine_args("--num-kv-blocks", "1")


def test_quantize_lm_head_flag():
    args = _engine_args("--quantization", "int4", "--quantize-lm-head")
    assert (args.quantization, args.quantize_lm_head) == ("int4", True)
    assert not _engine_args("-q", "int8").quantize_lm_head
    with pytest.raises(ValueError, match="quantize_lm_head: needs quantization"):
        _engine_args("--quantize-lm-head")
