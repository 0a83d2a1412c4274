"""The TensorRT runtime's decisions, without a GPU (docs/tensorrt.md section 7.1 quotes the documentation each
follows): KV buffers taken in turns or updated in place, one scratch block shared by the contexts and sized by
the rule the planner counts by, contexts that allocate nothing themselves, engines that would need host memory
refused, plugin creators registered at load without the parser's needs, the timing cache keyed by GPU and a
mismatched one handled, TensorRT-RTX engines built for stream capture.

TensorRT's objects are stood in for by `mock.create_autospec` of TensorRT-RTX's own classes: a call to a method
its bindings lack fails, so these doubles cannot drift from the API they stand for.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import onnx
import pytest
import torch

from engines.tensorrt.device_memory import ALIGNMENT, kv_buffers, shared_scratch_bytes, writes_in_place
from engines.tensorrt.kv_buffers import KvBuffers

NAMES = [("past.0.key", "present.0.key"), ("past.0.value", "present.0.value")]


def _buffers(in_place: bool) -> KvBuffers:
    made = iter(range(100))
    return KvBuffers(NAMES, lambda past, present: in_place, lambda: torch.full((1, 2), float(next(made))))


def test_kv_buffers_in_place_bind_one_buffer_as_both():
    kv = _buffers(in_place=True)
    assert kv.turns == 1 and kv.nbytes == 2 * 2 * 4
    for _ in range(3):
        bound = kv.bindings()
        assert bound["past.0.key"] is bound["present.0.key"] and bound["past.0.value"] is bound["present.0.value"]
        kv.advance()
        assert kv.turn == 0 and kv.current()[0] is bound["present.0.key"]


def test_kv_buffers_not_in_place_take_turns():
    """Run n reads buffer n % 2 and writes the other; after it the cache is where it wrote, and the next run
    reads it there. Two sets of bindings: one captured graph per turn."""
    kv = _buffers(in_place=False)
    assert kv.turns == 2 and kv.nbytes == 2 * 2 * 2 * 4
    first = kv.bindings()
    assert first["past.0.key"] is not first["present.0.key"]
    assert kv.turn == 0
    kv.advance()
    second = kv.bindings()
    assert kv.turn == 1 and second["past.0.key"] is first["present.0.key"]  # reads what the last run wrote
    assert second["present.0.key"] is first["past.0.key"] and kv.current()[0] is first["present.0.key"]
    kv.advance()
    assert kv.turn == 0 and kv.bindings()["past.0.key"] is first["past.0.key"]


def test_device_memory_rules():
    assert shared_scratch_bytes([1000, 70_000, 3]) == -(-70_000 // ALIGNMENT) * ALIGNMENT  # one block, the largest
    assert shared_scratch_bytes([]) == 0 and (kv_buffers(True), kv_buffers(False)) == (1, 2)
    assert writes_in_place(["TensorScatter"], "fp16") and not writes_in_place(["TensorScatter"], "int8")
    assert not writes_in_place(["ScatterElements", "ScatterND"], "fp16")
    assert not writes_in_place(["TensorScatter", "ScatterND"], "fp32")  # a prefill written otherwise: not all


# --- the engine session, over TensorRT-RTX's own classes as autospecs --------------------------------------------

trt_rtx = pytest.importorskip("tensorrt_rtx")


def _trt():
    from engines.tensorrt.flavours import load_trt

    return load_trt("tensorrt-rtx")


def _engine(trt, io: dict[str, tuple[str, str]], scratch: int, aliases=None, host=()):
    """An ICudaEngine double: io name -> (mode, dtype), its scratch size, output -> aliased input."""
    module = trt.module
    engine = mock.create_autospec(module.ICudaEngine, instance=True)
    names = list(io)
    engine.num_io_tensors = len(names)
    engine.get_tensor_name.side_effect = names.__getitem__
    engine.get_tensor_mode.side_effect = lambda n: getattr(module.TensorIOMode, io[n][0])
    engine.get_tensor_dtype.side_effect = lambda n: getattr(module.DataType, io[n][1])
    engine.is_shape_inference_io.side_effect = lambda n: n in host
    engine.get_aliased_input_tensor.side_effect = lambda n: (aliases or {}).get(n)
    engine.device_memory_size_v2 = scratch
    engine.create_execution_context.side_effect = lambda *a: mock.create_autospec(module.IExecutionContext,
                                                                                  instance=True)  # fmt: skip
    return engine


IO = {"inputs_embeds": ("INPUT", "HALF"), "past.0.key": ("INPUT", "HALF"), "logits": ("OUTPUT", "FLOAT"),
      "present.0.key": ("OUTPUT", "HALF")}  # fmt: skip


def test_engine_session_contexts_share_one_user_managed_scratch_block():
    """Each context is created USER_MANAGED (no scratch of its own: TensorRT's default STATIC would give each its
    engine's largest size), and every context gets the one block the planner counts: the largest engine's
    `device_memory_size_v2`, rounded to the alignment TensorRT asks for."""
    from engines.tensorrt.engine_session import EngineSession, share_scratch

    trt = _trt()
    sizes = {"vision_encoder": 5_000_123, "decoder": 12_345_678}
    sessions = [
        EngineSession(trt, None, _engine(trt, IO, size), Path(f"{name}.engine")) for name, size in sizes.items()
    ]
    for session in sessions:
        strategy = session.engine.create_execution_context.call_args.args[0]
        assert strategy == trt_rtx.ExecutionContextAllocationStrategy.USER_MANAGED
    allocated = []
    block = share_scratch(sessions, lambda n: allocated.append(n) or torch.empty(n, dtype=torch.uint8))
    assert allocated == [shared_scratch_bytes(sizes.values())] and allocated[0] % ALIGNMENT == 0
    for session in sessions:  # the same address and size for every context
        session.context.set_device_memory.assert_called_once_with(block.data_ptr(), block.numel())
    small = torch.empty(100, dtype=torch.uint8)
    with pytest.raises(Exception, match="needs 12345678 bytes of scratch, given 100"):
        sessions[1].attach_scratch(small)


def test_engine_session_reads_aliasing_and_refuses_host_io():
    from engines.tensorrt.engine_manifest import EngineError
    from engines.tensorrt.engine_session import EngineSession

    trt = _trt()
    session = EngineSession(trt, None, _engine(trt, IO, 10, aliases={"present.0.key": "past.0.key"}), Path("d"))
    assert session.inputs == ["inputs_embeds", "past.0.key"] and session.outputs == ["logits", "present.0.key"]
    assert session.aliased("present.0.key", "past.0.key") and not session.aliased("logits", "past.0.key")
    assert session.dtypes["logits"] == torch.float32 and session.dtypes["past.0.key"] == torch.float16
    unaliased = EngineSession(trt, None, _engine(trt, IO, 10), Path("d"))
    assert not unaliased.aliased("present.0.key", "past.0.key")  # the query said None
    with pytest.raises(EngineError, match=r"\['past.0.key'\] are shape-inference I/O"):
        EngineSession(trt, None, _engine(trt, IO, 10, host={"past.0.key"}), Path("d"))


def test_capture_asks_tensorrt_rtx_first():
    from engines.tensorrt.engine_session import EngineSession

    trt = _trt()
    session = EngineSession(trt, None, _engine(trt, IO, 10), Path("d"))
    stream = mock.Mock(cuda_stream=1234)
    session.context.is_stream_capturable.return_value = False
    assert not session.capturable(stream)
    session.context.is_stream_capturable.assert_called_once_with(1234)
    session.context.is_stream_capturable.return_value = True
    assert session.capturable(stream)


def test_tensorrt_rtx_builds_for_stream_capture():
    """TensorRT-RTX documents REQUIRE_USER_ALLOCATION as the condition for capturing an enqueue (RTX 1.2+)."""
    trt = _trt()
    config = trt.module.Builder(trt.logger()).create_builder_config()
    trt.require_user_allocation(config)
    assert config.get_flag(trt.module.BuilderFlag.REQUIRE_USER_ALLOCATION)


# --- timing cache ------------------------------------------------------------------------------------------------


def test_timing_cache_is_kept_per_gpu(monkeypatch, tmp_path):
    from engines.tensorrt.build import build_gpu, default_timing_cache
    from engines.tensorrt.flavours import Trt, TrtFlavour

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    enterprise = Trt(TrtFlavour.tensorrt, mock.Mock(__version__="10.3.0.30"))
    orin = default_timing_cache(enterprise, "sm87-orin")
    assert orin == tmp_path / "fusion-export" / "timing-tensorrt-10.3.0.30-sm87-orin.cache"
    assert default_timing_cache(enterprise, "sm90-nvidia-h100-80gb-hbm3") != orin
    props = mock.Mock(major=8, minor=7, name="Orin (nvgpu)")
    props.name = "Orin (nvgpu)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    assert build_gpu() == "sm87-orin-nvgpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert build_gpu() == "no-gpu"


def _builder_config(accepts: bool, kept=True):
    """An IBuilderConfig double whose set_timing_cache accepts or refuses a cache (another GPU's, for one)."""
    config = mock.create_autospec(trt_rtx.IBuilderConfig, instance=True)
    config.create_timing_cache.side_effect = lambda data: mock.Mock(data=data)
    config.set_timing_cache.side_effect = lambda cache, ignore_mismatch: accepts or cache.data == b""
    config.get_timing_cache.return_value = mock.Mock(serialize=lambda: b"timings") if kept else None
    return config


def test_a_timing_cache_from_another_gpu(capsys):
    """set_timing_cache(cache, ignore_mismatch=False) says False for another GPU's cache: --timing-cache is refused
    by name; the default cache restarts empty (said so); a builder that ends with no cache saves nothing."""
    from engines.tensorrt.build import EngineBuildError, timing_cache_bytes, use_timing_cache

    trt = _trt()
    config = _builder_config(accepts=True)
    use_timing_cache(trt, config, b"this gpu", None)
    assert [c.args[0].data for c in config.set_timing_cache.call_args_list] == [b"this gpu"]
    config = _builder_config(accepts=False)
    with pytest.raises(
        EngineBuildError, match=r"--timing-cache /x/t.cache: .*\(made by another TensorRT version or GPU"
    ):
        use_timing_cache(trt, config, b"another gpu", Path("/x/t.cache"))
    use_timing_cache(trt, config, b"another gpu", None)
    assert "does not fit this TensorRT or GPU; starting anew" in capsys.readouterr().err
    assert config.set_timing_cache.call_args.args[0].data == b""  # a fresh cache in its place
    assert config.set_timing_cache.call_args.kwargs == {"ignore_mismatch": False}
    assert timing_cache_bytes(_builder_config(True)) == b"timings"
    assert timing_cache_bytes(_builder_config(True, kept=False)) is None


# --- plugins ------------------------------------------------------------------------------------------------------


def test_plugin_creators_register_at_load_without_the_parser(monkeypatch):
    """Loading engines needs only the creators in the registry: the parser's library link (which may write into
    site-packages) is not attempted, so a read-only install loads them; a build still needs it."""
    from engines.plugins import rtx_plugins
    from engines.plugins.tensorrt_plugins import register_plugins
    from fusion_export.plugin_ops.onnx_forms import DECODE_ATTENTION

    trt = _trt()
    monkeypatch.setattr(rtx_plugins, "parser_can_import_plugins", lambda folder=None: "read-only file system")
    building = register_plugins(trt, [DECODE_ATTENTION])
    assert building[DECODE_ATTENTION].startswith("local function") and "read-only" in building[DECODE_ATTENTION]
    loading = register_plugins(trt, [DECODE_ATTENTION], parsing=False)
    assert loading == {DECODE_ATTENTION: rtx_plugins.IMPLEMENTATION}
    assert trt.module.get_plugin_registry().get_creator(DECODE_ATTENTION, "1", "") is not None


def test_the_manifest_says_how_plugins_were_built():
    """A registered plugin that no engine holds (the parser inlined its local function) is recorded as such."""
    from engines.tensorrt.build import _as_built

    registered = {
        "DecodeAttention": "IPluginV3 (Python, Triton JIT)",
        "WindowMaxPool": "IPluginV3 (Python, Triton JIT)",
    }
    engines = {"vision_encoder": {"plugin_layers": {}}, "decoder_step": {"plugin_layers": {"DecodeAttention": 6}}}
    built = _as_built(registered, engines)
    assert built["DecodeAttention"] == registered["DecodeAttention"]
    assert built["WindowMaxPool"] == "local function: the parser inlined it although a plugin was registered"


# --- the session's bindings end to end, with ONNX Runtime executing what TensorRT would ---------------------------


class OrtEngine:
    """An EngineSession stand-in: the engine's ONNX graph (the vision encoder's, or the merged decoder TensorRT
    builds from) run on ONNX Runtime with the tensors bound to it, as TensorRT runs the engine at their addresses:
    inputs read when the run executes, outputs written into their bound buffers. Under a CUDA graph capture (the
    FakeCuda below) a run is recorded with the bindings of that moment and replayed later with those, as a real
    captured graph replays fixed addresses."""

    def __init__(self, model, folder, io: dict, in_place: bool, cuda):
        import onnxruntime
        from onnx.external_data_helper import load_external_data_for_model

        from engines.tensorrt.engine_session import TORCH_DTYPES

        model = onnx.ModelProto.FromString(model.SerializeToString())  # the weights loaded into a copy
        load_external_data_for_model(model, str(folder))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 2
        self.ort = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.inputs = [t["name"] for t in io["inputs"]]
        self.outputs = [t["name"] for t in io["outputs"]]
        self.dtypes = {t["name"]: TORCH_DTYPES[t["dtype"]] for t in [*io["inputs"], *io["outputs"]]}
        self.in_place, self.cuda, self.bound, self.runs = in_place, cuda, {}, 0

    def aliased(self, output: str, input_name: str) -> bool:  # the in-place flavour's KV-cache update layers
        return self.in_place and output.replace("present", "past_key_values") == input_name

    def set_inputs(self, tensors):
        self.bound.update(tensors)

    def bind_outputs(self, tensors):
        self.bound.update(tensors)

    def output_shape(self, name):  # TensorRT infers it from the input shapes; here a run tells
        feeds = {n: self.bound[n].numpy() for n in self.inputs}
        return tuple(self.ort.run([name], feeds)[0].shape)

    def execute(self, stream):
        bindings = dict(self.bound)
        if self.cuda.capturing is not None:
            self.cuda.capturing.recorded.append((self, bindings))
        else:
            self.run(bindings)

    def run(self, bindings):
        outputs = self.ort.run(self.outputs, {n: bindings[n].numpy() for n in self.inputs})
        for name, value in zip(self.outputs, outputs):
            bindings[name].copy_(torch.from_numpy(value))
        self.runs += 1

    def capturable(self, stream):
        return True


class FakeCuda:
    """torch.cuda's stream, graph and CUDAGraph as the TensorRT session uses them, on the CPU."""

    def __init__(self):
        self.capturing, self.graphs, self.replays = None, [], 0
        cuda = self

        class Graph:
            def __init__(self):
                self.recorded = []
                cuda.graphs.append(self)

            def replay(self):
                cuda.replays += 1
                for engine, bindings in self.recorded:
                    engine.run(bindings)

        self.CUDAGraph = Graph

    def stream(self, stream):
        import contextlib

        return contextlib.nullcontext()

    def graph(self, graph, stream=None, capture_error_mode=None):
        import contextlib

        assert capture_error_mode == "thread_local"  # as trtexec captures

        @contextlib.contextmanager
        def capture():
            self.capturing = graph
            try:
                yield
            finally:
                self.capturing = None

        return capture()


def _cpu_session(folder, artifact_folder, monkeypatch):
    """A TrtModel over a real engine folder, its engines executed by OrtEngine on the CPU."""
    from engines.tensorrt.engine_manifest import open_engines
    from engines.tensorrt.runtime import TrtModel
    from fusion_export.decoder_merge import merge_decoder
    from reference_model.input_files import read_tensor

    cuda = FakeCuda()
    for name in ("stream", "graph", "CUDAGraph"):
        monkeypatch.setattr(torch.cuda, name, getattr(cuda, name))
    model = TrtModel(open_engines(folder))
    manifest = model.engines.manifest
    load = lambda name: onnx.load(artifact_folder / f"{name}.onnx", load_external_data=False)  # noqa: E731
    graphs = {"vision_encoder": load("vision_encoder"),
              "decoder": merge_decoder(load("decoder_prefill"), load("decoder_step"))}  # fmt: skip
    in_place = manifest["plan"]["kv_in_place"]
    model.sessions = {name: OrtEngine(graphs[name], artifact_folder, manifest["engines"][name]["io"], in_place, cuda)
                      for name in model.engines.engine_names}  # fmt: skip
    model.device, model.stream, model._loaded = torch.device("cpu"), mock.Mock(), True
    entry = manifest["embeddings"]
    model.embed_table = read_tensor(folder / entry["file"], entry["tensor"], framework="np")
    return model, cuda


@pytest.mark.parametrize("target,max_context", [("trt-10.3", None), ("trt-10.15", 1024)])
def test_trt_session_generates_the_reference_tokens(export_demo, demo_checkpoint, tmp_path, monkeypatch, target,
                                                    max_context):  # fmt: skip
    """TrtSession as it drives TensorRT (engines/tensorrt/runtime.py), its engines executed by ONNX Runtime on the
    CPU: KV bindings in place (trt-10.15) or taking turns (trt-10.3), steps captured once per turn and replayed,
    inputs copied into the captured buffers. Two left-padded requests generate the reference's greedy tokens; a
    session whose KV buffers stopped taking turns does not."""
    from engines.tensorrt.build import BuildOptions, build_engines
    from engines.tensorrt.kv_buffers import KvBuffers
    from engines.tensorrt.plan import BuildLimits
    from reference_model import GenerationConfig, generate, load_model, make_request, prepare_batch
    from reference_model.generation import ReferenceSession
    from reference_model.prompt import load_tokenizer

    from .conftest import DEMO_IMAGE

    artifact = export_demo(target, "fp32", max_context)
    limits = BuildLimits(max_batch=2, max_context=None if max_context else 1024)
    folder = build_engines(artifact, tmp_path / "eng", BuildOptions(limits=limits), verbose=False).folder
    model, cuda = _cpu_session(folder, artifact, monkeypatch)
    tokenizer = load_tokenizer(model.model_dir)
    questions = ["What is in front of the house?", "Count the boxes, then name their colours."]
    requests = [make_request(DEMO_IMAGE, q, tokenizer, model.config) for q in questions]
    batch = prepare_batch(requests, model.config, 16)
    config = GenerationConfig(max_new_tokens=10)
    reference = generate(ReferenceSession(load_model(demo_checkpoint), batch, 10), config)
    session = model.session(batch, 10)
    turns = 1 if target == "trt-10.15" else 2
    assert session.kv.turns == turns
    out = generate(session, config)
    assert out.token_ids == reference.token_ids
    assert len(cuda.graphs) == turns and sorted(session.captured) == list(range(turns))
    assert cuda.replays == 9 - turns  # 9 steps after the prefill: the first of each turn eager, then replays
    assert model.sessions["decoder"].runs == 1 + 9  # the prefill, then every step exactly once

    # a conversation's next turn for the left-padded row: its kept columns copied into the buffers, its chunk run
    # through the decoder engine with the block's latents: the reference's follow-up tokens
    from reference_model.conversation import ReferenceFollowUp, follow_up_chunk, turn_state
    from reference_model.prompt import end_of_turn_id, follow_up_ids

    end = end_of_turn_id(tokenizer)
    reference_session = ReferenceSession(load_model(demo_checkpoint), batch, 10)
    reference = generate(reference_session, config)
    kept = {"engines": turn_state(session, 0, out.token_ids[0]),
            "reference": turn_state(reference_session, 0, reference.token_ids[0])}  # fmt: skip
    assert kept["engines"].length == kept["reference"].length == batch.layout.seq_len + len(out.token_ids[0]) - 1
    chunk = follow_up_chunk(kept["engines"].pending, end, [end], follow_up_ids("And what colour is it?", tokenizer))
    follow = generate(model.follow_up(kept["engines"], [chunk], 10), config)
    expected = generate(ReferenceFollowUp(reference_session.model, kept["reference"], [chunk], 10), config)
    assert follow.token_ids == expected.token_ids

    if turns == 2:  # the same bindings every run: the prefill's cache is never read back
        monkeypatch.setattr(KvBuffers, "advance", lambda self: None)
        broken = generate(model.session(batch, 10), config)
        assert broken.token_ids != reference.token_ids
