"""Every entry point turns a bad argument or an unreadable file into one `error:` line that names it, and exit status
2: no Python traceback, and a refused command writes nothing. The cases are run in-process (`main(argv)`), where an
unhandled exception fails the test with its traceback."""
import os

import pytest

import bench
import eval as eval_cli
import export
import plan
import plot
import sample
import train
from conftest import TINY
from data import prepare


def refused(capsys, main, argv: list[str], *named: str) -> str:
    """Run `main(argv)`; it must exit 2 (argparse's SystemExit counts) with an error line that names each of `named`."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    line = next((l for l in err.splitlines() if "error:" in l), "")
    assert line and all(n in line for n in named), err
    assert "Traceback" not in err
    return line


@pytest.fixture
def files(tmp_path) -> dict:
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes(b"caf\xe9\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return {"missing": str(tmp_path / "missing"), "not_utf8": str(not_utf8), "file": str(a_file)}


def test_sample_refuses_bad_arguments(trained, files, capsys):
    refused(capsys, sample.main, [trained, "--top_p", "0"], "--top_p")
    refused(capsys, sample.main, [trained, "--top_p", "1.5"], "--top_p")
    refused(capsys, sample.main, [trained, "--temperature", "-1"], "--temperature")
    refused(capsys, sample.main, [trained, "--prompt_file", files["missing"]], "--prompt_file", files["missing"])
    refused(capsys, sample.main, [trained, "--prompt_file", files["not_utf8"]], "--prompt_file", "UTF-8")
    refused(capsys, sample.main, [trained, "--prompt", "x", "--prompt_file", files["file"]], "--prompt")
    refused(capsys, sample.main, [files["missing"]], files["missing"], "does not exist")
    refused(capsys, sample.main, [files["file"]], files["file"], "is a file")
    refused(capsys, sample.main, [trained, "--precision", "fp9"], "--precision")


def test_eval_and_export_refuse_bad_arguments(trained, files, tmp_path, capsys):
    refused(capsys, eval_cli.main, [files["missing"]], files["missing"])
    refused(capsys, eval_cli.main, [trained, "--max_tokens", "0"], "--max_tokens")
    refused(capsys, eval_cli.main, [trained, "--data", files["missing"]], files["missing"])
    refused(capsys, export.main, [trained, "--to", "hf", files["file"]], files["file"], "is a file")
    refused(capsys, export.main, [trained, "--to", "hf", str(tmp_path / "m"), "--merge"], "--merge")
    assert not os.path.exists(tmp_path / "m")
    refused(capsys, export.main, [files["missing"], "--to", "hf", str(tmp_path / "x")], files["missing"])
    refused(capsys, export.main, [trained, "--to", "gguf", str(tmp_path / "x")], "--to")


def test_train_plan_bench_plot_refuse_bad_arguments(files, tmp_path, capsys):
    refused(capsys, train.main, [files["missing"] + ".yaml"], files["missing"])
    refused(capsys, train.main, ["configs/tiny.yaml", "train.lr=fast"], "train.lr")
    refused(capsys, train.main, ["configs/tiny.yaml", "train.nope=1"], "train.nope")
    refused(capsys, train.main, ["configs/tiny.yaml", "data.datasets=[" + files["missing"] + "]", *TINY,
                                 f"train.out_dir={tmp_path / 'run'}"], files["missing"])
    refused(capsys, plan.main, ["configs/tiny.yaml", "--gpus", "0"], "--gpus")
    refused(capsys, plan.main, ["configs/tiny.yaml", "train.batch_size=oops"], "train.batch_size")
    refused(capsys, plan.main, ["configs/tiny.yaml", "--gpus", "3"], "train.batch_size")  # 16 over 3 GPUs
    refused(capsys, plan.main, ["configs/tiny.yaml", "train.micro_batch_size=5"], "train.micro_batch_size")
    refused(capsys, bench.main, ["configs/tiny.yaml", "--steps", "0"], "--steps")
    refused(capsys, bench.main, [files["missing"] + ".yaml"], files["missing"])
    refused(capsys, plot.main, [files["missing"]], files["missing"])


def test_prepare_refuses_bad_arguments(files, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("def f():\n    return 1\n")
    out = str(tmp_path / "ds")
    refused(capsys, prepare.main, ["--input", str(src), "--out", out, "--val_frac", "2"], "--val_frac")
    refused(capsys, prepare.main, ["--input", str(src), "--out", out, "--vocab_size", "0"], "--vocab_size")
    refused(capsys, prepare.main, ["--input", str(src), "--out", out, "--tokenizer", "gpt2", "--vocab_size", "300"],
            "--vocab_size")
    refused(capsys, prepare.main, ["--input", files["missing"], "--out", out], files["missing"])
    refused(capsys, prepare.main, ["--verify", files["missing"]], files["missing"])
    refused(capsys, prepare.main, ["--out", out], "--input")
    assert not os.path.exists(out)


@pytest.mark.parametrize("main,args,word", [
    (sample.main, ["--max_new_tokens", "-5"], "--max_new_tokens"), (sample.main, ["--num_samples", "0"], "--num_samples"),
    (eval_cli.main, ["--max_tokens", "0"], "--max_tokens"), (eval_cli.main, ["--batch_size", "-1"], "--batch_size"),
    (bench.main, ["--steps", "0"], "--steps"), (plan.main, ["--gpus", "0"], "--gpus")])
def test_negative_or_zero_counts_are_refused(main, args, word, capsys):
    target = ["configs/tiny.yaml"] if main in (bench.main, plan.main) else ["out/none"]
    refused(capsys, main, [*target, *args], word, "is below")
