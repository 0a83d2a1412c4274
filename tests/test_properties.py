"""Property-based checks (hypothesis, derandomized so CI runs the same examples every time).

- Any image Pillow can hold (mode, size, aspect ratio, content) either becomes five finite crops in [-1, 1] or is
  refused with an ImageError; nothing else escapes.
- Any question text (unicode, control characters, the prompt's own markers, very long) either becomes a request
  the model can run or is refused with a RequestError.
- Any batch of such requests, at any exported query_len, gives the same greedy tokens and the same logits
  (within the fp32 gate) on ONNX Runtime as on the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from engines.onnxruntime.session import OrtModel
from fusion_export.manifest import open_artifact
from reference_model import GenerationConfig, ReferenceSession, generate, make_request, prepare_batch
from reference_model.errors import FusionError
from reference_model.image_preprocessing import ImageError, static_hd_crops
from reference_model.prompt import IMAGE_TOKEN, LATENT_TOKEN, VISION_END, VISION_START, RequestError, load_tokenizer

from .conftest import DEMO_IMAGE

CI = settings(
    derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LA", "La", "I;16", "I;16B", "I", "F", "LAB", "HSV", "PA"]


@st.composite
def images(draw) -> Image.Image:
    mode = draw(st.sampled_from(MODES))
    width = draw(st.integers(1, 900))
    height = draw(st.integers(1, 900))
    seed = draw(st.integers(0, 2**32 - 1))
    bands = len(Image.new(mode, (1, 1)).getbands())
    rng = np.random.default_rng(seed)
    image = Image.new(mode, (width, height))
    if mode in ("I;16", "I;16B"):
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    elif mode in ("I", "F"):
        high = draw(st.sampled_from([255, 70000]))  # 8-bit data stored wide, or a real wide range
        values = rng.integers(0, high + 1, (height, width)).astype(np.int32 if mode == "I" else np.float32)
        image = Image.fromarray(values)
    else:
        noise = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
        image.frombytes(noise.tobytes())
    return image


@settings(CI, max_examples=60)
@given(image=images())
def test_any_image_becomes_crops_or_a_clear_error(image):
    try:
        crops = static_hd_crops(image)
    except ImageError as e:
        assert str(e).startswith("image: ")
        return
    assert crops.shape == (5, 3, 384, 384) and crops.dtype == torch.float32
    assert bool(torch.isfinite(crops).all()) and crops.min() >= -1 and crops.max() <= 1


questions = st.one_of(
    st.text(max_size=60),  # any unicode, control characters and surrogates included
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=60),
    st.lists(
        st.sampled_from([IMAGE_TOKEN, LATENT_TOKEN, VISION_START, VISION_END, "<|end|>", "a", " ", "\n", "é"])
    ).map("".join),
    st.integers(4000, 5000).map(lambda n: "q" * n),  # around the 4096-token question limit
)


@settings(CI, max_examples=80)
@given(question=questions)
def test_any_question_becomes_a_request_or_a_clear_error(tiny_model, tiny_tokenizer, question):
    try:
        request = make_request(Image.new("RGB", (32, 24)), question, tiny_tokenizer, tiny_model.config)
        batch = prepare_batch([request], tiny_model.config, 16)
    except RequestError as e:
        assert str(e)
        return
    assert batch.layout.batch_size == 1 and int(batch.instructs[0, 0]) > 0
    assert (batch.layout.text_ids >= 0).all() and (batch.layout.text_ids < tiny_model.config.decoder.vocab_size).all()


@settings(CI, max_examples=40)
@given(query_len=st.integers(-5, 400))
def test_any_query_len_is_accepted_or_refused(query_len):
    from reference_model import preset_config

    config = preset_config("tiny")
    try:
        assert config.check_query_len(query_len) == query_len
    except FusionError:
        return
    side = int(round(query_len**0.5))
    assert side * side == query_len and side * config.interaction.window_size <= config.global_grid_side


ROW_QUESTIONS = ["What is shown?", "Count the boxes.", "Is it sunny? Answer yes or no.", "x", "Colours ✓ éà"]


@pytest.fixture(scope="module")
def runtimes(export_oracle):
    """ONNX Runtime over the exports tests/test_onnx_parity.py makes too (both flavours; 4x4 and 8x8 windows)."""
    cases = [(16, "trt-10.3"), (64, "trt-10.15")]
    return {q: OrtModel(open_artifact(export_oracle(q, target))) for q, target in cases}


@settings(CI, max_examples=8)
@given(
    query_len=st.sampled_from([16, 64]),
    rows=st.lists(st.tuples(st.sampled_from(ROW_QUESTIONS), st.booleans()), min_size=1, max_size=3),
)
def test_reference_and_onnxruntime_agree(oracle_model, oracle_dir, runtimes, query_len, rows):
    """Batch composition (1-3 rows, different question lengths, flipped images) and query_len vary; the two
    backends must agree on every greedy token and within the fp32 validation gate on every logit."""
    tokenizer = load_tokenizer(oracle_dir)
    requests = []
    for question, flip in rows:
        request = make_request(DEMO_IMAGE, question, tokenizer, oracle_model.config)
        if flip:
            request.pixel_values = request.pixel_values.flip(-1)
        requests.append(request)
    batch = prepare_batch(requests, oracle_model.config, query_len)
    config = GenerationConfig(max_new_tokens=4)
    ours = generate(runtimes[query_len].session(batch, 4), config, keep_logits=True)
    ref = generate(ReferenceSession(oracle_model, batch, 4), config, keep_logits=True)
    assert ours.token_ids == ref.token_ids
    assert (ours.step_logits - ref.step_logits).abs().max().item() <= 1e-4  # the fp32 gate (validation.py)
