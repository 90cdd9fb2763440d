"""A golden run: the shipped tiny config's losses over 20 steps, recorded from the code before the readable-core
refactor. A refactor that leaves the maths alone keeps them bit for bit on the CPU kind they were recorded on."""
import json
import os

import torch

import hardware
import train
from conftest import ROOT

# configs/tiny.yaml (its model, Muon recipe and schedule) on the test corpus, FP32 and 4 sequences a step so that
# 20 steps take seconds; recorded with torch 2.13.0 on an Intel CPU with AMX (torch's AVX512 kernels)
RECORDED_ON = ("2.13.0", "AVX512", "AMX")
LOSSES = [
    6.274307727813721, 6.231373310089111, 6.246215343475342, 6.055140495300293,
    6.049038410186768, 5.95950984954834, 5.88043737411499, 5.784523010253906,
    5.741267681121826, 5.646772861480713, 5.630617141723633, 5.4913129806518555,
    5.508330345153809, 5.426103591918945, 5.340555191040039, 5.546728134155273,
    5.122274398803711, 5.119475841522217, 5.018474578857422, 4.923340320587158]


def test_the_tiny_recipe_gives_the_recorded_losses(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = str(tmp_path / "golden")
    assert train.main(["configs/tiny.yaml", f"data.datasets=[{corpus}]", f"train.out_dir={out}", "train.max_steps=20",
                       "train.max_minutes=0", "train.precision=fp32", "train.batch_size=4", "train.micro_batch_size=4",
                       "train.eval_interval=0", "log.interval=1", "train.ckpt_interval=1000"]) == 0
    assert "compile: false" in open(os.path.join(out, "config.yaml")).read()  # compile auto: 20 steps stay eager
    with open(os.path.join(out, "metrics.jsonl")) as f:
        losses = [row["loss"] for row in map(json.loads, f) if "loss" in row]
    here = (torch.__version__.split("+")[0], torch.backends.cpu.get_cpu_capability(),
            hardware.cpu_bf16_instructions()[1])
    if here == RECORDED_ON:
        assert losses == LOSSES  # bit for bit
    else:  # other kernels sum in another order: the same run within FP32 rounding, grown over 20 steps
        assert len(losses) == 20 and max(abs(a - b) for a, b in zip(losses, LOSSES)) < 5e-3, (here, losses)
