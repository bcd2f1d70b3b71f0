"""User errors end as `error: ...` with exit status 2, naming the file, key or value, never as a
traceback: bad data files, hostile JSON, an unusable output disk, absurd config values."""

import errno
import json

import pytest

from nemo_plugins.arch.config import homogeneous
from nemo_plugins.arch.hf_json import to_hf_config
from nemo_plugins.cli import main as cli
from nemo_plugins.data import sft_data as S
from nemo_plugins.errors import InputFileError

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "thinking": False}


def test_jsonl_path_that_is_a_directory_or_missing_is_named(tmp_path):
    with pytest.raises(InputFileError, match=f"{tmp_path}: is a directory; expected a JSONL file"):
        list(S.read_messages_jsonl([tmp_path]))
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such JSONL file"):
        list(S.read_messages_jsonl([tmp_path / "missing.jsonl"]))


def test_deeply_nested_json_line_is_a_bad_record_not_a_crash(tmp_path):
    """100,000 nested "[" raised RecursionError out of the reader, even with on_error=skip."""
    f = tmp_path / "deep.jsonl"
    f.write_text(json.dumps(GOOD) + "\n" + "[" * 100_000 + "\n" + json.dumps(GOOD) + "\n")
    reader = S.read_messages_jsonl([f])
    assert len(list(reader)) == 2
    assert reader.report.skipped == 1 and reader.report.reasons == {"bad_json": 1}
    with pytest.raises(S.BadRecord, match=r"deep.jsonl:2: .*nested deeper than the JSON parser can follow"):
        list(S.read_messages_jsonl([f], on_error="raise"))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_unwritable_output_disk_is_exit_2_naming_the_file(monkeypatch, capsys, code):
    def full_disk(args):
        raise OSError(code, "simulated", "/out/report.json")

    monkeypatch.setattr(cli, "cmd_inspect", full_disk)
    assert cli.main(["inspect", "whatever"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: /out/report.json: simulated") and "output_dir" in err


def test_other_os_errors_still_raise(monkeypatch):
    def broken(args):
        raise OSError(errno.EIO, "simulated I/O error")

    monkeypatch.setattr(cli, "cmd_inspect", broken)
    with pytest.raises(OSError, match="I/O error"):
        cli.main(["inspect", "whatever"])


def test_absurd_ffn_mult_is_refused_by_inspect(tmp_path, capsys):
    """ffn_mult: 1e30 overflowed with a C++ frame dump, and `inspect` printed a 1.3e23 TiB model with exit 0."""
    cfg = homogeneous(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                      intermediate_size=256)  # fmt: skip
    hf = to_hf_config(cfg, "nemotron-nas")
    hf["block_configs"][1]["ffn"]["ffn_mult"] = 1e30
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert cli.main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "block_configs[1].ffn.ffn_mult=1e+30" in err and "above the 16,777,216" in err
