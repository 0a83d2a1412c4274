"""Upstream's own checkpoints of the two family members the oracles leave out (tests/data/upstream: FUSION-X-Phi's
Phi + SigLIP2 pair with grouped-query attention, FUSION-LLaMA's LLaMA + SigLIP pair over 3 KV heads), made and
run by the unmodified upstream code after the reference was written: `fusion-export golden` reproduces them under
the oracles' gates (tests/test_oracle_parity.py: measured 3.1e-6 and 3.6e-6 on prefill logits, 1.4e-6 on step
logits), and the prompts tokenize as upstream's did."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from reference_model import ReferenceSession, Request, load_model, prepare_batch
from reference_model.image_preprocessing import static_hd_crops
from reference_model.prompt import build_prompt, instruct_ids, load_tokenizer, template_of, tokenize_prompt

from .conftest import UNSEEN_ORACLES, run_main
from .test_oracle_parity import LOGITS_TOL, max_abs


@pytest.fixture(params=sorted(UNSEEN_ORACLES))
def unseen(request):
    folder = UNSEEN_ORACLES[request.param]
    return folder, json.loads((folder / "meta.json").read_text())


def test_golden_reproduces_upstream(unseen, tmp_path):
    folder, meta = unseen
    inputs = load_file(folder / "inputs.safetensors")
    inputs["images"] = static_hd_crops(folder / "image.png")[None]  # vendored without them: rebuilt bit for bit
    save_file(inputs, tmp_path / "inputs.safetensors")
    expected = load_file(folder / "outputs.safetensors")
    steps = expected["generated_ids"].shape[1]
    result = run_main("golden", "--model", str(folder), "--inputs", str(tmp_path / "inputs.safetensors"),
                      "--out", str(tmp_path / "golden.safetensors"), "--query-len", str(meta["query_len"]),
                      "--max-new-tokens", str(steps))  # fmt: skip
    assert result.returncode == 0, result.stderr
    golden = load_file(tmp_path / "golden.safetensors")
    assert golden["generated_ids"].tolist() == expected["generated_ids"].tolist() == [meta["generated_ids"][0]]
    assert max_abs(golden["logits"], expected["logits"]) <= LOGITS_TOL
    assert max_abs(golden["generate_step_logits"], expected["generate_step_logits"]) <= LOGITS_TOL


def test_other_query_lengths_and_prompt(unseen):
    folder, meta = unseen
    model = load_model(folder)
    inputs, expected = load_file(folder / "inputs.safetensors"), load_file(folder / "outputs.safetensors")
    request = Request(inputs["input_ids"][0].tolist(), inputs["instructs"][0].tolist(),
                      static_hd_crops(folder / "image.png"))  # fmt: skip
    for query_len in meta["extra_query_lens"]:
        session = ReferenceSession(model, prepare_batch([request], model.config, query_len), max_new_tokens=1)
        session.keep_prefill_logits = True
        with torch.inference_mode():
            session.prefill()
        assert max_abs(session.prefill_logits, expected[f"logits_query_len_{query_len}"]) <= LOGITS_TOL, query_len
    tokenizer = load_tokenizer(folder)
    assert build_prompt(meta["question"], template_of(tokenizer)) == meta["prompt"]
    assert tokenize_prompt(meta["prompt"], tokenizer) == request.input_ids
    assert instruct_ids(meta["question"], tokenizer) == request.instructs
