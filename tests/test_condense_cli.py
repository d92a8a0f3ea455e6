"""`python -m scaling.condense` end to end on the bundled corpus, and its user errors."""

from __future__ import annotations

import json

import pytest

from scaling.condense import main

FAST = ["--repetitions", "3", "--max-length", "48", "--no-progress"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bundled_corpus_end_to_end(tiny_gpt2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "--model", tiny_gpt2_dir, "--out", out, "--last-n", 2, *FAST)
    assert code == 0
    record = json.loads((out / "condensation.json").read_text())
    assert {"layers", "spearman", "kendall", "model", "num_params", "repetitions", "max_length"} <= set(record)
    from transformers import AutoModelForCausalLM

    tied_once = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).parameters())
    assert record["repetitions"] == 3 and record["max_length"] == 48 and record["num_params"] == tied_once
    assert record["source"]["label"] == "bundled" and record["source"]["distinct_texts"] == 3
    assert len(record["layers"]) == 4  # 3 blocks + embedding output
    for index, layer in enumerate(record["layers"]):
        assert layer["layer"] == index and len(layer["histogram"]) == 128
        assert -1.0 <= layer["mean_cosine_offdiag"] <= layer["mean_cosine"] <= 1.0
        assert layer["effective_rank"] > 1.0
    means = [layer["mean_cosine"] for layer in record["layers"]]
    assert record["last_n_mean_cosine"] == pytest.approx(sum(means[-2:]) / 2)
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "spearman" in stdout and "layer" in stdout and str(out) in stdout


def test_texts_file_cycles_documents_of_different_lengths(tiny_gpt2_dir, tmp_path, capsys):
    texts = tmp_path / "docs.txt"
    texts.write_text("A short document about cosine similarity.\n\n" + "A much longer document. " * 40 + "\n")
    out = tmp_path / "out"
    code, _, _ = run_cli(capsys, "--model", tiny_gpt2_dir, "--texts", texts, "--out", out,
                         "--repetitions", 5, "--max-length", 64, "--no-progress", "--no-effective-rank")
    assert code == 0
    record = json.loads((out / "condensation.json").read_text())
    assert record["source"]["distinct_texts"] == 2 and record["num_sequences"] == 5
    assert record["tokens"]["max"] == 64 and record["tokens"]["min"] < 40
    assert record["layers"][0]["effective_rank"] is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "/no/such/model-dir"], "does not exist"),
        (["--model", "EMPTY_DIR"], "not a model folder"),
        (["--dtype", "float8"], "dtype='float8' is unknown"),
        (["--device", "tpu"], "device='tpu' is unknown"),
        (["--dtype", "float16", "--device", "cpu"], "float16"),
        (["--max-length", "1000"], "exceeds the context"),
        (["--last-n", "9"], "--last-n 9"),
        (["--repetitions", "0"], "--repetitions 0"),
        (["--texts", "EMPTY"], "no non-empty text"),
        (["--texts", "MISSING.txt"], "no such file"),
        (["--dataset", "nonsense"], "not understood"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(tiny_gpt2_dir, tmp_path, capsys, extra, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    placeholders = {"EMPTY": str(empty), "MISSING.txt": str(tmp_path / "MISSING.txt"), "EMPTY_DIR": str(tmp_path)}
    extra = [placeholders.get(a, a) for a in extra]
    argv = ["--model", tiny_gpt2_dir, "--out", tmp_path / "out", *FAST, *extra]
    code, _, stderr = run_cli(capsys, *argv)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("condense: error:"), stderr
    assert message in lines[0]
    assert not (tmp_path / "out" / "condensation.json").exists()
