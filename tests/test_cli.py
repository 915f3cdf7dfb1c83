"""The command line: dump, sites, cache; bad input gets one line and status 2."""

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import DATA, oracle_model
from fxlens.tools.cli import main

GPT2 = str(DATA / "models" / "gpt2")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fxlens: "), err
    assert "Traceback" not in err
    return lines[0]


def test_sites_lists_every_hook_with_its_shape(capsys):
    code, out, err = run(capsys, "sites", GPT2)
    assert code == 0
    names = oracle_model("gpt2").hook_names
    rows = {parts[0]: parts[1:] for parts in map(str.split, out.splitlines()) if parts and parts[0] in names}
    assert list(rows) == names
    # probe: batch 1, pos 5; gpt2-tiny has 4 heads of 16
    assert " ".join(rows["blocks.1.attn.hook_pattern"][:4]) == "[1, 4, 5, 5]"
    assert rows["blocks.1.attn.hook_pattern"][-1] == "transformer.h.1.attn"
    assert " ".join(rows["blocks.0.attn.hook_z"][:4]) == "[1, 5, 4, 16]"


def test_cache_saves_activations_with_metadata(capsys, tmp_path):
    out_file = tmp_path / "acts.safetensors"
    # a glob, an exact name, and two names that share one tensor in the graph
    names = ["blocks.*.attn.hook_pattern", "hook_embed", "blocks.0.hook_resid_post,blocks.1.hook_resid_pre"]
    code, out, err = run(capsys, "cache", GPT2, "--prompt", "Hello world", "--names", *names, "-o", out_file)
    assert code == 0, err
    model = oracle_model("gpt2")
    want_tokens = model.to_tokens("Hello world")
    _, want = model.run_with_cache(want_tokens)
    with safe_open(str(out_file), "pt") as f:
        meta = f.metadata()
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert set(got) == {"blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern", "blocks.2.attn.hook_pattern",
                        "hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"}
    for name, t in got.items():
        assert torch.equal(t, want[name]), name
    assert meta["model"] == GPT2 and meta["prompt"] == "Hello world"
    assert json.loads(meta["tokens"]) == want_tokens[0].tolist()
    processing = json.loads(meta["processing"])
    assert {"fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"} <= set(processing)
    assert not any(processing.values())


def test_dump_per_pass_writes_the_graph_after_each_pass(capsys, tmp_path):
    out_file = tmp_path / "gpt2.txt"
    code, out, err = run(capsys, "dump", GPT2, "-o", out_file, "--per-pass")
    assert code == 0, err
    passes = sorted(tmp_path.glob("gpt2.*-*.txt"))
    assert [p.name for p in passes] == ["gpt2.01-split_shared_norms.txt", "gpt2.02-expose_norms.txt",
                                        "gpt2.03-relative_bias.txt", "gpt2.04-discover_sites.txt",
                                        "gpt2.05-insert_hooks.txt"]
    _, norms, relative, found, hooked = (p.read_text() for p in passes)
    # GPT-2 has no ALiBi: relative_bias matches nothing (the graph below the header is unchanged)
    assert relative.split("\n", 1)[1] == norms.split("\n", 1)[1]
    n_hooks = len(oracle_model("gpt2").hook_names)
    # before discovery no sites; after it sites are annotated, not yet hooked
    assert "sites=" not in norms and "site=" not in norms and "created_by=expose_norms" in norms
    assert "sites=" in found and " site=" not in found and f"{n_hooks} hook sites" in found.splitlines()[0]
    assert hooked.count(" site=") == n_hooks
    assert out_file.read_text().count(" site=") == n_hooks
    assert out.splitlines()[-1].startswith(f"wrote {out_file}")


def test_dump_format_flag_and_modules_level(capsys, tmp_path):
    out_file = tmp_path / "graph.out"
    code, _, err = run(capsys, "dump", GPT2, "-o", out_file, "--format", "json", "--level", "modules")
    assert code == 0, err
    data = json.loads(out_file.read_text())
    assert data["graph"]["level"] == "modules"
    assert "transformer.h.1.attn" in {n["id"] for n in data["nodes"]}


@pytest.mark.parametrize("argv, message", [
    (["sites", DATA / "no-such-model"], "cannot load"),
    (["sites", DATA / "ORACLE.md"], "cannot load"),
    (["dump", GPT2, "-o", DATA / "missing-folder" / "g.html"], "does not exist"),
    (["dump", GPT2, "-o", DATA, "--format", "txt"], "is a directory"),
    (["dump", GPT2, "-o", "graph.png"], "cannot tell the dump format"),
    (["cache", GPT2, "--prompt", "hi", "-o", DATA / "missing-folder" / "a.safetensors"], "does not exist"),
])
def test_bad_input_is_one_line_and_status_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert re.search(message, one_error_line(err))


def test_unknown_hook_name_in_names(capsys, tmp_path):
    out_file = tmp_path / "acts.safetensors"
    code, _, err = run(capsys, "cache", GPT2, "--prompt", "hi", "--names", "blocks.0.hook_resid_psot",
                       "-o", out_file)
    assert code == 2
    line = one_error_line(err)
    assert "unknown hook name 'blocks.0.hook_resid_psot'" in line and "blocks.0.hook_resid_post" in line
    assert not out_file.exists()


def test_the_installed_command_prints_no_traceback(tmp_path):
    """The real process: exit status, and stderr holds the one line and nothing
    else (no traceback, no library noise)."""
    proc = subprocess.run([sys.executable, "-m", "fxlens.tools.cli", "dump", str(tmp_path / "nothing-here"),
                           "-o", str(tmp_path / "g.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "cannot load" in one_error_line(proc.stderr)


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("smollm2", "dump", "sites", "cache"):
        assert cmd in out
