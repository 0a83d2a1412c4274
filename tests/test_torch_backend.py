"""The torch backend (engines/pytorch): greedy tokens identical to the upstream oracles and to the reference, on the
CPU in fp32; its static cache's capacity and its options refused by name. Its Triton kernels run in the
interpreter here (the decode step's split attention on the LLaMA oracle's grouped heads; the whole kernel path,
prefill included, in tests/test_gpu_acceptance.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from engines.backends import BackendOptions, open_backend
from engines.pytorch.backend import TorchRunner
from engines.pytorch.decode_step import StepAttention
from reference_model import GenerationConfig, ReferenceSession, Request, generate, load_model, prepare_batch
from reference_model.errors import FusionError
from reference_model.generation import GenerationError

from .conftest import VENDORED_ORACLES, run_main

LOGITS_TOL = 1e-5  # the reference's own gate against the oracles (tests/test_oracle_parity.py): measured <= 2.5e-6


def oracle_request(folder) -> tuple[Request, dict]:
    inputs, outputs = load_file(folder / "inputs.safetensors"), load_file(folder / "outputs.safetensors")
    request = Request(input_ids=inputs["input_ids"][0].tolist(), instructs=inputs["instructs"][0].tolist(),
                      pixel_values=inputs["images"][0])  # fmt: skip
    return request, outputs


@pytest.mark.parametrize("name", sorted(VENDORED_ORACLES))
def test_greedy_tokens_equal_the_oracle(name):
    """The oracle's own greedy ids and step logits, with a capacity larger than the request (columns past the
    written ones are never read)."""
    folder = VENDORED_ORACLES[name]
    request, outputs = oracle_request(folder)
    expected = outputs["generated_ids"].tolist()
    backend = open_backend("torch", folder, BackendOptions(max_context=2048))
    assert backend.settings.attention is StepAttention.valid and not backend.settings.graph
    batch = prepare_batch([request], backend.config, backend.config.default_query_len)
    out = generate(backend.session(batch, len(expected[0])), GenerationConfig(max_new_tokens=len(expected[0])),
                   keep_logits=True)  # fmt: skip
    assert out.token_ids == expected
    assert (out.step_logits - outputs["generate_step_logits"]).abs().max().item() <= LOGITS_TOL


@pytest.mark.slow  # 30 s of interpreted kernels; the kernel's GQA is in the default suite (test_plugin_kernels.py)
def test_split_kernel_step_on_grouped_heads():
    """The LLaMA oracle (12 heads over 3 KV heads, head size 20) with the split decode-attention kernel in the
    step (interpreted): the oracle's first ids and logits (3 of 6: the interpreter's cost). The prefill's kernels
    are left to the acceptance run (tests/test_gpu_acceptance.py)."""
    folder = VENDORED_ORACLES["fusion-x-llama-tiny"]
    request, outputs = oracle_request(folder)
    expected = [outputs["generated_ids"][0, :3].tolist()]
    backend = open_backend("torch", folder, BackendOptions(max_context=1200, kernels="on"))
    assert backend.settings.attention is StepAttention.kernel
    batch = prepare_batch([request], backend.config, backend.config.default_query_len)
    session = backend.session(batch, len(expected[0]))
    session.kernels = False  # reference ops in the prefill, the kernel in every step
    out = generate(session, GenerationConfig(max_new_tokens=len(expected[0])), keep_logits=True)
    assert out.token_ids == expected
    assert (out.step_logits - outputs["generate_step_logits"][:, :3]).abs().max().item() <= LOGITS_TOL


STEPS = 8
SAMPLING = GenerationConfig(max_new_tokens=STEPS, temperature=0.8, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def demo_batch(demo_checkpoint):
    """Two requests of different lengths (left padding) about the oracle's picture, on the demo model, and the
    reference's greedy output (tokens, step logits) and sampled tokens for them."""
    request, _ = oracle_request(VENDORED_ORACLES["fusion-phi-tiny"])
    model = load_model(demo_checkpoint)
    ids = request.input_ids
    last = max(i for i, t in enumerate(ids) if t < 0)  # the latents' placeholder: drop 12 question ids after it
    short = Request(ids[: last + 1] + ids[last + 13 :], request.instructs[-6:], request.pixel_values)
    batch = prepare_batch([request, short], model.config, model.config.default_query_len)
    greedy = generate(ReferenceSession(model, batch, STEPS), GenerationConfig(max_new_tokens=STEPS), keep_logits=True)
    sampled = generate(ReferenceSession(model, batch, STEPS), SAMPLING).token_ids
    return model, batch, greedy, sampled


@pytest.mark.parametrize("attention", [StepAttention.valid, StepAttention.masked])
def test_batch_equals_the_reference(demo_checkpoint, demo_batch, attention):
    """A left-padded batch: the reference's tokens and logits, by the step that slices the written columns and by
    the one a CUDA graph captures (the whole capacity under the mask); sampling with the same seed too."""
    model, batch, expected, sampled = demo_batch
    backend = open_backend("torch", demo_checkpoint, BackendOptions(max_context=batch.layout.seq_len + 40))
    backend.load()
    if attention is StepAttention.masked:  # what a CUDA graph captures, here run eagerly on the CPU
        backend._runner = TorchRunner(model, dataclasses.replace(backend.settings, attention=attention))
    out = generate(backend.session(batch, STEPS), GenerationConfig(max_new_tokens=STEPS), keep_logits=True)
    assert backend.runner.static_batch(2).step.attention is attention
    assert out.token_ids == expected.token_ids
    assert (out.step_logits - expected.step_logits).abs().max().item() <= LOGITS_TOL
    if attention is StepAttention.valid:
        assert generate(backend.session(batch, STEPS), SAMPLING).token_ids == sampled


def test_graph_flow_equals_the_reference(demo_checkpoint, demo_batch, monkeypatch):
    """What a GPU run does around its CUDA graph, with the graph replaced by a stand-in that warms up and 'captures'
    by running the step, and 'replays' by running it again into the captured output tensor: the capture before the
    first prefill (its warm-up writes column 0 and the mask) corrupts nothing, every step reads its inputs from the
    same device tensors, and two sessions in a row replay the one capture."""
    import engines.pytorch.session as session_module

    class StandInGraph:
        captures = 0

        def __init__(self, step, warmup: int = 2):
            for _ in range(warmup):
                step(check_values=False)
            self.step, self.logits = step, step(check_values=False)
            StandInGraph.captures += 1

        def __call__(self):
            return self.logits.copy_(self.step(check_values=False))

    monkeypatch.setattr(session_module, "CapturedStep", StandInGraph)
    model, batch, expected, _ = demo_batch
    backend = open_backend("torch", demo_checkpoint, BackendOptions(max_context=batch.layout.seq_len + 40))
    settings = dataclasses.replace(backend.settings, graph=True, attention=StepAttention.masked)
    runner = TorchRunner(model, settings)
    for steps in (STEPS, 3):
        out = generate(runner.session(batch, steps), GenerationConfig(max_new_tokens=steps))
        assert out.token_ids == [t[:steps] for t in expected.token_ids]
    assert StandInGraph.captures == 1


def test_capacity_and_sessions(demo_checkpoint, demo_batch):
    """A request past the static cache is refused before any work, naming --max-context; a session whose cache a
    newer session took over refuses to step."""
    model, batch = demo_batch[:2]
    backend = open_backend("torch", demo_checkpoint, BackendOptions(max_context=batch.layout.seq_len + 4))
    with pytest.raises(GenerationError, match=r"torch backend's KV cache holds \d+ \(--max-context\)"):
        backend.session(batch, 5)
    assert backend._runner is None  # refused before the weights were read
    first = backend.session(batch, 4)
    first.prefill()
    second = backend.session(batch, 4)
    second.prefill()
    with pytest.raises(GenerationError, match="taken over by a newer session"):
        first.step(torch.zeros(2, dtype=torch.int64))
    assert second.step(torch.zeros(2, dtype=torch.int64)).shape == (2, model.config.decoder.vocab_size)


@pytest.mark.parametrize(
    "options, match",
    [
        (BackendOptions(max_context=0), "--max-context 0"),
        (BackendOptions(max_context=10**7), "--max-context 10000000: the model has 131072 positions"),
        (BackendOptions(kernels="on", dtype="bf16"), "--torch-kernels on: .* not bf16"),
        (BackendOptions(cuda_graph="on"), "--cuda-graph on needs a CUDA device"),
        (BackendOptions(kernels="sometimes"), "--torch-kernels sometimes: choose from auto, on, off"),
        (BackendOptions(device="cuda:0"), "--device cuda:0: CUDA is not available"),
    ],
)
def test_bad_options(demo_checkpoint, options, match):
    with pytest.raises(FusionError, match=match):
        open_backend("torch", demo_checkpoint, options)


def test_kernels_outside_the_interpreter_are_refused(demo_checkpoint, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(FusionError, match="Triton kernels run on CUDA devices, not cpu"):
        open_backend("torch", demo_checkpoint, BackendOptions(kernels="on"))
    assert not open_backend("torch", demo_checkpoint, BackendOptions()).settings.kernels  # auto: off on the CPU


def test_cli_generate(demo_checkpoint):
    """`generate --backend torch` answers as the reference does; its flags are refused elsewhere by name."""
    image = VENDORED_ORACLES["fusion-phi-tiny"] / "image.png"
    common = ("generate", "--model", str(demo_checkpoint), "--image", str(image), "--question", "What is it?",
              "--max-new-tokens", "6", "--quiet")  # fmt: skip
    reference = run_main(*common)
    torch_run = run_main(*common, "--backend", "torch", "--max-context", "1200", "--torch-kernels", "off")
    assert reference.returncode == torch_run.returncode == 0, torch_run.stderr
    assert torch_run.stdout == reference.stdout
    refused = run_main(*common, "--max-context", "1200")
    assert refused.returncode == 2 and "--max-context does not apply to --backend reference" in refused.stderr
    too_small = run_main(*common, "--backend", "torch", "--max-context", "100")
    assert too_small.returncode == 2 and "(--max-context)" in too_small.stderr


def test_served_by_the_official_client(demo_checkpoint, tmp_path):
    """`serve --backend torch`'s pipeline behind the app: the official OpenAI client gets the reference's greedy
    answer. The torch flags are refused without --backend torch, and --backend torch on a folder that is not a
    checkpoint, before anything loads."""
    import base64
    import socket
    import threading
    import time

    import openai
    import uvicorn

    from engines.pipeline import Pipeline
    from fusion_export.bundled import DEMO_IMAGE
    from fusion_export_cli.commands.serve import backend_options
    from fusion_export_cli.server.app import ServerSettings, create_app
    from fusion_export_cli.server.chat import Limits

    args = type("Args", (), dict.fromkeys(("dtype", "device", "torch_kernels", "cuda_graph", "torch_compile")))()
    args.backend, args.max_context = "torch", 1200
    backend, options = backend_options(args, demo_checkpoint)
    fusion = Pipeline.open(demo_checkpoint, backend, options)
    assert fusion.backend.kind == "torch" and fusion.backend.max_context == 1200
    expected = Pipeline.open(demo_checkpoint).generate(DEMO_IMAGE, "What is it?", max_new_tokens=6)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServerSettings(model_id="fusion-demo", limits=Limits(max_tokens=16), api_key="k", max_queue=2,
                              max_body_bytes=1_000_000)  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(create_app(fusion, settings), host="127.0.0.1", port=port,
                                           log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        url = "data:image/png;base64," + base64.b64encode(DEMO_IMAGE.read_bytes()).decode()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=120)
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
        reply = client.chat.completions.create(model="fusion-demo", max_tokens=6, temperature=0,
                                               messages=[{"role": "user", "content": content}])  # fmt: skip
        assert reply.choices[0].message.content == expected.text
    finally:
        server.should_exit = True
        thread.join(30)
    refused = run_main("serve", str(demo_checkpoint), "--torch-kernels", "off")
    assert refused.returncode == 2 and "--torch-kernels applies to --backend torch" in refused.stderr
    refused = run_main("serve", str(tmp_path), "--backend", "torch")
    assert refused.returncode == 2 and "--backend torch runs a checkpoint folder (config.json)" in refused.stderr
