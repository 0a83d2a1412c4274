"""One decoder graph for prefill and decode: the step graph with the prefill graph's interaction layers inlined.

A TensorRT engine holds its own copy of every weight its network reads, so a prefill engine and a step engine hold
the decoder twice (issue 26). This graph reads each weight once and serves both phases:
- the decoder layers are the step graph's, unchanged. Their attention reads the KV buffer under the mask and writes
  columns at `write_indices`, so a prefill is a step of `seq` new tokens written at column 0 with the prompt's
  mask in the first `seq` columns: the same masked attention, the same KV columns (ONNX Runtime: equal to the
  prefill graph's logits and cache, tests/test_decoder_merge.py);
- after decoder layer i, interaction layer k runs as the prefill graph computes it, its nodes copied out (with
  any quantization nodes). Those nodes hold no count of latents (graphs/interaction.py), so a decode step binds
  `vision_pos` [B, 0] and `global_ctx` [B, 0, D]: the layers then gather, attend over and scatter nothing.

No conditional is needed, and none builds: TensorRT-RTX 1.7.1 refuses an `If` around each whole graph (its KV-cache
update needs the cache to be a network input, which a tensor inside a conditional is not) and fails in Myelin on
an `If` around each interaction layer. What the candidates weigh, measured: docs/tensorrt.md section 4.1.

```text
inputs_embeds                   [batch, tokens, hidden]        prefill: the prompt; step: the new tokens
attention_mask                  [batch, capacity]              1 = valid column (a prefill: its prompt's columns)
rope_cos, rope_sin              [batch, tokens, head_dim]
write_indices                   [batch]                        0 at a prefill
vision_pos                      [batch, latents]               prefill: query_len; step: 0
instruct_pos                    [batch, 1]                     step: 0 (any column inside the new tokens)
global_ctx                      [batch, context, hidden]       prefill: (s*w)^2; step: 0
past_key_values.{i}.key|value   [batch, kv_heads, capacity, head_dim]
-> logits, present.{i}.key|value
```
Each interaction layer is found by the layer scope the exporter records on every node (`onnx_export.SCOPE_KEY`):
its input is the value a decoder layer's node hands to an interaction layer's node, its output the value the
interaction layer hands back to the decoder, and its nodes the prefill graph's backward slice from that output to
that input (shape arithmetic the exporter shares with the decoder is copied too). The step graph's hidden state
between the same two decoder layers is found the same way and rewired through the copied nodes. Anything that
does not separate this cleanly is refused with the layer named.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import onnx

from reference_model.errors import FusionError

from .graph_inputs import STEP_INPUTS
from .plugin_ops.onnx_forms import DOMAIN as PLUGIN_DOMAIN

# the merged graph's dims that neither graph has: the new tokens of either phase, and the latents and context grid
# entries, all of them at a prefill and none at a decode step
MERGED_DIMS = {"inputs_embeds": {1: "tokens"}, "rope_cos": {1: "tokens"}, "rope_sin": {1: "tokens"},
               "vision_pos": {1: "latents"}, "global_ctx": {1: "context"}}  # fmt: skip
INTERACTION_INPUTS = ("vision_pos", "instruct_pos", "global_ctx")  # the prefill graph's inputs the layers read
SAME_AT_PREFILL = ("inputs_embeds",)  # an input the layers may read the shape of: the same at a merged prefill
DECODER_SCOPE, INTERACTION_SCOPE, NORM_SCOPE = "model.layers.", "model.interaction.", "model.norm"
# the node metadata key the exporter writes (onnx_export.py): the decoder layer, interaction layer or final norm a
# node computes, e.g. "model.layers.3"
SCOPE_KEY = "fusion_export.scope"


class MergeError(FusionError):
    """The prefill and step graphs do not merge into one decoder graph (which layer, and why)."""


def _scope(node: onnx.NodeProto) -> str:
    return next((m.value for m in node.metadata_props if m.key == SCOPE_KEY), "")


def _is_decoder(scope: str) -> bool:
    return scope.startswith(DECODER_SCOPE) or scope == NORM_SCOPE


class _Graph:
    """Producers and consumers of a graph's values."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output if out}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        # values that carry data from the inputs; a shape computation (exporter CSE shares them across layers) not
        self.data = {i.name for i in graph.input}
        for node in graph.node:
            if node.op_type not in ("Shape", "Size") and any(n in self.data for n in node.input):
                self.data.update(node.output)

    def handed(self, from_scope, to_scope) -> list[str]:
        """Values a node whose scope passes `from_scope` hands to a node whose scope passes `to_scope`."""
        return sorted(
            {name for name, node in self.producer.items() if name in self.data and from_scope(_scope(node))
             and any(to_scope(_scope(c)) for c in self.consumers[name])}
        )  # fmt: skip


def _one(values: list[str], what: str) -> str:
    if len(values) != 1:
        raise MergeError(f"{what}: found {len(values)} candidates {values[:4]} (re-export with this version)")
    return values[0]


def _island(p: _Graph, output: str, boundary: str, layer: str) -> list[onnx.NodeProto]:
    """The prefill nodes `output` is computed from, back to `boundary` (and graph inputs and initializers)."""
    needed, stack = set(), [output]
    while stack:
        name = stack.pop()
        node = p.producer.get(name)
        if name == boundary or node is None or id(node) in needed:
            continue
        if _is_decoder(_scope(node)) and name in p.data:
            raise MergeError(f"{layer} reads {name!r} of {_scope(node)}, not only the hidden state it is given")
        needed.add(id(node))
        stack.extend(n for n in node.input if n)
    return [node for node in p.graph.node if id(node) in needed]


def _op_types(nodes: list[onnx.NodeProto]) -> Counter:
    return Counter(n.op_type for n in nodes if _is_decoder(_scope(n)))


def _entries(values) -> list[dict]:
    """Graph inputs as the manifest lists them: name, and shape with dim names or sizes."""
    return [{"name": v.name, "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}
            for v in values]  # fmt: skip


def merged_inputs(prefill: list[dict], step: list[dict]) -> list[dict]:
    """The merged graph's inputs from the two graphs' (manifest entries: name, shape, and any other field): the
    step graph's, then the interaction layers', before the KV cache, with MERGED_DIMS named."""
    p, s = {e["name"]: e for e in prefill}, {e["name"]: e for e in step}
    names = [n for n in s if n in STEP_INPUTS] + list(INTERACTION_INPUTS) + [n for n in s if n not in STEP_INPUTS]
    out = []
    for name in names:
        entry = dict(s.get(name) or p[name])
        entry["shape"] = list(entry["shape"])
        for axis, dim in MERGED_DIMS.get(name, {}).items():
            entry["shape"][axis] = dim
        out.append(entry)
    return out


def _find_layer(p: _Graph, s: _Graph, scope: str, layer: str, p_inputs) -> tuple[str, str, str, list]:
    """Interaction layer `scope`'s input and output in the prefill graph, the step graph's hidden state at the same
    place, and the prefill nodes that compute the layer."""
    h_in = _one(p.handed(lambda x: x.startswith(DECODER_SCOPE), lambda x: x == scope), f"{layer}'s input")
    h_out = _one(p.handed(lambda x: x == scope, _is_decoder), f"{layer}'s output")
    after = _scope(p.producer[h_in])  # "model.layers.i"
    following = {_scope(c) for c in p.consumers[h_out] if _is_decoder(_scope(c))}
    # the step graph's value between the same decoder layers, read by the same kinds of nodes as the layer's output
    wanted = _op_types(p.consumers[h_out])
    candidates = [v for v in s.handed(lambda x: x == after, lambda x: x in following)
                  if _op_types(s.consumers[v]) == wanted]  # fmt: skip
    hidden = _one(candidates, f"the step graph's hidden state after {after}")
    nodes = _island(p, h_out, h_in, layer)
    reads = {n for node in nodes for n in node.input if n and n not in p.producer and n != h_in}
    foreign = sorted(n for n in reads if n in p_inputs and n not in INTERACTION_INPUTS + SAME_AT_PREFILL)
    if foreign:
        raise MergeError(f"{layer} reads the prefill input(s) {foreign}, which the step graph gives other meaning")
    return h_in, h_out, hidden, nodes


def _carry_initializers(names: list[str], p_inits: dict, s: _Graph, added: dict[str, str]) -> dict[str, str]:
    """The prefill initializers an inlined layer reads, by their merged names: a tensor the step graph holds byte
    for byte is shared; another is added, renamed `prefill/<name>` where the step graph has that name already."""
    s_inits = {t.name: t for t in s.graph.initializer}
    for name in names:
        if name in added:
            continue
        same = name in s_inits and s_inits[name].SerializeToString() == p_inits[name].SerializeToString()
        free = name not in s_inits and name not in s.producer
        added[name] = name if same or free else f"prefill/{name}"
        if not same:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(p_inits[name])
            tensor.name = added[name]
            s.graph.initializer.append(tensor)
    return {name: added[name] for name in names}


def merge_decoder(prefill: onnx.ModelProto, step: onnx.ModelProto) -> onnx.ModelProto:
    """The one decoder model (the inputs are not modified). External weights stay where the graphs point."""
    merged = onnx.ModelProto()
    merged.CopyFrom(step)
    graph = merged.graph
    p, s = _Graph(prefill.graph), _Graph(graph)
    p_out = [(o.name, o.type.tensor_type.elem_type) for o in prefill.graph.output]
    if p_out != [(o.name, o.type.tensor_type.elem_type) for o in graph.output]:
        raise MergeError("decoder_prefill and decoder_step return different outputs")

    p_inits = {t.name: t for t in prefill.graph.initializer}
    p_inputs = {i.name: i for i in prefill.graph.input}
    added: dict[str, str] = {}  # prefill initializer -> its name in the merged graph
    plugin = sorted({n.op_type for n in prefill.graph.node if n.domain == PLUGIN_DOMAIN})
    if plugin:
        raise MergeError(
            f"the prefill graph holds plugin nodes {plugin}: the InteractionAttention plugin takes a "
            "fixed number of latent rows, so one decoder graph needs an export with --plugins off"
        )
    layers = sorted({_scope(n) for n in prefill.graph.node if _scope(n).startswith(INTERACTION_SCOPE)},
                    key=lambda scope: int(scope.rsplit(".", 1)[1]))  # fmt: skip
    if not layers:
        raise MergeError("the prefill graph's nodes carry no interaction-layer scopes (re-export with this version)")
    for scope in layers:
        k = scope.rsplit(".", 1)[1]
        h_in, h_out, hidden, nodes = _find_layer(p, s, scope, f"interaction layer {k}", p_inputs)
        prefix = f"interaction.{k}"
        names = {out: f"{prefix}/{out}" for node in nodes for out in node.output if out}
        names[h_in] = hidden
        reads = {n for node in nodes for n in node.input if n in p_inits}
        names.update(_carry_initializers(sorted(reads), p_inits, s, added))
        inlined = []
        for node in nodes:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{prefix}/{node.name}"
            copy.input[:] = [names.get(n, n) for n in node.input]
            copy.output[:] = [names.get(n, n) for n in node.output]
            inlined.append(copy)
        for consumer in s.consumers[hidden]:  # the next decoder layer now reads the interaction layer's output
            consumer.input[:] = [names[h_out] if n == hidden else n for n in consumer.input]
        position = list(graph.node).index(s.producer[hidden]) + 1
        nodes_now = list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes_now[:position] + inlined + nodes_now[position:])
        s = _Graph(graph)

    # inputs: as merged_inputs lists them
    entries = {e["name"]: e for e in merged_inputs(_entries(prefill.graph.input), _entries(step.graph.input))}
    infos = {i.name: i for i in [*graph.input, *prefill.graph.input]}
    del graph.input[:]
    for name, entry in entries.items():
        info = onnx.ValueInfoProto()
        info.CopyFrom(infos[name])
        for dim, size in zip(info.type.tensor_type.shape.dim, entry["shape"]):
            dim.Clear()
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size
        graph.input.append(info)
    # plugin functions and opsets of both graphs (an interaction plugin's function comes from the prefill graph)
    have = {(f.domain, f.name, f.overload) for f in merged.functions}
    merged.functions.extend(f for f in prefill.functions if (f.domain, f.name, f.overload) not in have)
    opsets = {o.domain: o.version for o in merged.opset_import}
    for o in prefill.opset_import:
        if opsets.setdefault(o.domain, o.version) != o.version:
            raise MergeError(f"the decoder graphs import opset {o.domain or 'ai.onnx'} in two versions")
        if o.domain not in {x.domain for x in merged.opset_import}:
            merged.opset_import.append(o)
    graph.name = "decoder"
    return merged
