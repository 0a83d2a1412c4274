#!/usr/bin/env python
"""Run the UNMODIFIED upstream FUSION code (github.com/starriver030515/FUSION) on a checkpoint folder in the
real FUSION format and write an oracle folder (inputs / intermediates / outputs safetensors + meta.json).

Procedure = fusion/eval/run_fusion.py + fusion/model/builder.py (load_pretrained_model) with CPU/float32
instead of cuda/float16:
  * tokenizer = AutoTokenizer.from_pretrained(<ckpt>/tokenizer, use_fast=False); add <vision_start>/<vision_end>
    (builder does, mm_use_im_start_end=True); model.resize_token_embeddings(len(tokenizer)) (a no-op here)
  * qs = <vision_start><image><vision_end>\\n + question; conv template phi_3 (fusion_phi) / llama_3 (fusion_llama)
  * input_ids = tokenizer_image_token(prompt); instructs = tokenizer(question).input_ids
  * images = process_images([img], vision_tower.image_processor, model.config)  (static_hd: 4 crops + full)
  * model.generate(input_ids, images=, image_sizes=, instructs=, do_sample=False, num_beams=1,
    max_new_tokens=N, use_cache=True, eos_token_id=None)
Observation only (no math change): a forward hook on the top-level model records the prefill forward's
logits / decoder hidden states (output_hidden_states=True is passed to generate), wrappers around
encode_images / encode_global_images / prepare_inputs_labels_for_multimodal record intermediates.
model.config.query_len is set to the single requested value for each run (upstream draws
random.choice(config.query_len.split(',')) per call).
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import upstream_env  # noqa: E402  (sets threads=1, sys.path)
from upstream_env import (load_file, save_file, patch_siglip_defaults, make_tower_folder, tower_kind,  # noqa: E402
                          fusion_classes)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from fusion.constants import (IMAGE_TOKEN_INDEX, LATENT_IMAGE_TOKEN_INDEX, DEFAULT_IMAGE_TOKEN,  # noqa: E402
                              DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN)
from fusion.conversation import conv_templates  # noqa: E402
from fusion.mm_utils import process_images, tokenizer_image_token  # noqa: E402
from fusion.utils import disable_torch_init  # noqa: E402


def load_model(ckpt, workdir, log):
    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    vc = json.load(open(os.path.join(ckpt, "vision_config.json")))
    Model, _, conv_mode = fusion_classes(cfg["model_type"])
    kind = tower_kind(cfg["mm_vision_tower"])
    main_sd = load_file(os.path.join(ckpt, "model.safetensors"))
    patches = []
    if kind == "siglip":
        patches.append(patch_siglip_defaults(vc))
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)  # mm_vision_tower is a path relative to the working directory
    tpath = make_tower_folder(workdir, cfg["mm_vision_tower"], vc, main_sd)
    patches.append({"target": "local tower folder <workdir>/" + cfg["mm_vision_tower"],
                    "why": "upstream calls from_pretrained(mm_vision_tower) inside the model constructor "
                           "(unfreeze_mm_vision_tower=True)" + ("; SigLip2VisionConfig.from_pretrained(mm_vision_tower) "
                                                                "gives the tower shape" if kind == "siglip2" else ""),
                    "contents": "tiny tower saved with upstream's %s.save_pretrained; its weights are replaced by the "
                                "main checkpoint" % ("SigLip2VisionModel" if kind == "siglip2" else "SigLipVisionModel")})

    disable_torch_init()
    # builder.load_pretrained_model(device='cpu'): kwargs device_map={'':'cpu'}, low_cpu_mem_usage=True; float32
    model = Model.from_pretrained(ckpt, low_cpu_mem_usage=True, device_map={"": "cpu"}, torch_dtype=torch.float32,
                                  attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ckpt, "tokenizer"), use_fast=False)
    # builder: fusion branch
    if getattr(model.config, "mm_use_im_patch_token", True):
        tokenizer.add_tokens([DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)
    if getattr(model.config, "mm_use_im_start_end", False):
        tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
    assert len(tokenizer) == model.config.vocab_size, (len(tokenizer), model.config.vocab_size)
    model.resize_token_embeddings(len(tokenizer))
    vt = model.get_vision_tower()
    assert vt.is_loaded
    vt.to(device="cpu", dtype=torch.float32)
    model.eval()

    # check every parameter equals the checkpoint bit for bit
    sd = model.state_dict()
    missing = sorted(set(sd) - set(main_sd))
    unexpected = sorted(set(main_sd) - set(sd))
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    for k, v in main_sd.items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k
    log["loaded_state_dict_equals_file"] = True
    log["n_state_dict_keys"] = len(sd)
    log["attn_implementation"] = model.config._attn_implementation
    return model, tokenizer, conv_mode, cfg, vc, patches, main_sd


class Recorder:
    def __init__(self, model):
        self.model = model
        self.calls = []
        self.rec = {}
        self.sampler_calls = 0
        self.active = False
        m = model
        orig_enc, orig_glob, orig_prep = m.encode_images, m.encode_global_images, m.prepare_inputs_labels_for_multimodal

        def enc(*a, **k):
            out = orig_enc(*a, **k)
            if self.active:
                self.rec["image_features_full"] = out[0].detach().clone()
            return out

        def glob(*a, **k):
            out = orig_glob(*a, **k)
            if self.active:
                self.rec["global_image_features_full"] = out.detach().clone()
            return out

        def prep(*a, **k):
            out = orig_prep(*a, **k)
            if self.active and out[4] is not None:
                names = ["input_ids", "position_ids", "attention_mask", "past_key_values", "inputs_embeds", "labels",
                         "instruct_embeddings", "instruct_features", "instruct_mask", "vision_embeddings",
                         "vision_features", "global_ctx", "query_len", "instruct_pos", "vision_pos"]
                for n, v in zip(names, out):
                    if n in ("inputs_embeds", "instruct_embeddings", "instruct_features", "vision_embeddings",
                             "vision_features", "global_ctx", "instruct_pos", "vision_pos"):
                        self.rec[n] = v.detach().clone()
                self.rec["query_len"] = out[12]
            return out

        m.encode_images, m.encode_global_images, m.prepare_inputs_labels_for_multimodal = enc, glob, prep

        def hook(mod, args, kwargs, output):
            if not self.active:
                return
            emb = kwargs.get("inputs_embeds")
            ids = kwargs.get("input_ids")
            seq = emb.shape[1] if emb is not None else ids.shape[1]
            entry = {"seq_len": int(seq), "logits": output.logits.detach().clone(),
                     "n_sampler_calls": self.sampler_calls}
            if output.hidden_states is not None and len(self.calls) == 0:
                entry["hidden_states"] = [h.detach().clone() for h in output.hidden_states]
            self.calls.append(entry)
            self.sampler_calls = 0

        def shook(mod, args, output):
            if self.active:
                self.sampler_calls += 1

        self.h = model.register_forward_hook(hook, with_kwargs=True)
        for s in model.get_model().vision_sampler_layers:
            s.register_forward_hook(shook)

    def reset(self):
        self.calls, self.rec, self.sampler_calls = [], {}, 0


def build_inputs(model, tokenizer, conv_mode, question, image_path):
    qs = question
    image_token_se = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    if model.config.mm_use_im_start_end:
        qs = image_token_se + "\n" + qs
    else:
        qs = DEFAULT_IMAGE_TOKEN + "\n" + qs
    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], qs)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    image = Image.open(image_path).convert("RGB")
    image_sizes = [image.size]
    images = process_images([image], model.get_vision_tower().image_processor, model.config).to(dtype=torch.float32)
    input_ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt").unsqueeze(0)
    instruct_text = qs.replace(DEFAULT_IMAGE_TOKEN, "").replace(DEFAULT_IM_START_TOKEN, "").replace(
        DEFAULT_IM_END_TOKEN, "").strip()
    instructs = torch.tensor(tokenizer(instruct_text).input_ids, dtype=torch.long).unsqueeze(0)
    return prompt, instruct_text, input_ids, instructs, images, image_sizes


def run_generate(model, rec, inputs, query_len, max_new_tokens, hidden=False):
    input_ids, instructs, images, image_sizes = inputs
    model.config.query_len = str(query_len)
    rec.reset()
    rec.active = True
    with torch.inference_mode():
        out = model.generate(input_ids, images=images, image_sizes=image_sizes, instructs=instructs,
                             do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, use_cache=True,
                             eos_token_id=None, return_dict_in_generate=True, output_logits=True,
                             output_hidden_states=hidden)
    rec.active = False
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True, help="folder: config.json, vision_config.json, model.safetensors, tokenizer/")
    ap.add_argument("--image", required=True)
    ap.add_argument("--question", required=True)
    ap.add_argument("--query-len", type=int, required=True)
    ap.add_argument("--extra-query-lens", default="")
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seed", type=int, default=0, help="recorded only (weights come from the checkpoint)")
    ap.add_argument("--check-inputs", default=None, help="an existing inputs.safetensors that must equal ours")
    ap.add_argument("--intermediates", default="all", help="'all' or comma list of keys to keep")
    ap.add_argument("--no-copy", action="store_true", help="do not copy checkpoint files into --out")
    args = ap.parse_args()

    ckpt = os.path.abspath(args.ckpt)
    out_dir = os.path.abspath(args.out)
    image_path = os.path.abspath(args.image)
    workdir = os.path.abspath(args.workdir)
    os.makedirs(out_dir, exist_ok=True)
    random.seed(0)
    torch.manual_seed(0)
    log = {}
    model, tokenizer, conv_mode, cfg, vc, patches, main_sd = load_model(ckpt, workdir, log)
    rec = Recorder(model)

    prompt, instruct_text, input_ids, instructs, images, image_sizes = build_inputs(
        model, tokenizer, conv_mode, args.question, image_path)
    if args.check_inputs:
        ref = load_file(args.check_inputs)
        log["check_inputs"] = {
            "input_ids_equal": bool(torch.equal(ref["input_ids"], input_ids)),
            "instructs_equal": bool(torch.equal(ref["instructs"], instructs)),
            "images_max_abs_diff": float((ref["images"] - images).abs().max()) if ref["images"].shape == images.shape else "shape",
            "image_sizes_equal": ref["image_sizes"].tolist() == [list(s) for s in image_sizes],
        }
        print("check_inputs", log["check_inputs"])
    inputs = (input_ids, instructs, images, image_sizes)

    # main run: greedy generate, prefill captured
    g = run_generate(model, rec, inputs, args.query_len, args.max_new_tokens, hidden=True)
    calls = rec.calls
    assert len(calls) == args.max_new_tokens, len(calls)
    prefill = calls[0]
    generated_ids = g.sequences.clone()
    step_logits = torch.stack(list(g.logits), dim=1).float()  # (1, N, V)
    assert generated_ids.shape == (1, args.max_new_tokens)
    for t in range(args.max_new_tokens):
        assert torch.equal(step_logits[0, t], calls[t]["logits"][0, -1])
    outputs = {"logits": prefill["logits"], "generated_ids": generated_ids, "generate_step_logits": step_logits}
    for i, h in enumerate(prefill["hidden_states"]):
        outputs[f"hidden_states_{i}"] = h
    inter = dict(rec.rec)
    gf = inter.pop("global_image_features_full")
    side = int(round(gf.shape[1] ** 0.5))
    inter[f"global_image_features_{side}x{side}"] = gf
    qlen_seen = inter.pop("query_len")
    assert qlen_seen == args.query_len
    instrumentation = {
        "generate_decoder_calls": [{"seq_len": c["seq_len"], "n_sampler_calls": c["n_sampler_calls"]} for c in calls],
        "interaction_only_at_prefill": calls[0]["n_sampler_calls"] == cfg["num_of_vision_sampler_layers"]
        and all(c["n_sampler_calls"] == 0 for c in calls[1:]),
        "instruct_pos_is_last_prompt_position": int(inter["instruct_pos"][0, -1]) == prefill["seq_len"] - 1,
    }
    margins = []
    for t in range(step_logits.shape[1]):
        top = torch.topk(step_logits[0, t], 2).values
        margins.append(float(top[0] - top[1]))

    # determinism + extra query lengths (each: a fresh generate with 1 new token, prefill logits kept)
    g2 = run_generate(model, rec, inputs, args.query_len, 1)
    instrumentation["forward_repeatable"] = bool(torch.equal(rec.calls[0]["logits"], prefill["logits"]))
    extra = [int(x) for x in args.extra_query_lens.split(",") if x.strip()]
    for q in extra:
        run_generate(model, rec, inputs, q, 1)
        outputs[f"logits_query_len_{q}"] = rec.calls[0]["logits"]
    model.config.query_len = cfg["query_len"]

    inter_all = dict(inter)
    keep = None if args.intermediates == "all" else set(args.intermediates.split(","))
    if keep is not None:
        inter = {k: v for k, v in inter.items() if k in keep}

    def clean(d):
        return {k: v.detach().contiguous().clone() for k, v in d.items()}

    save_file(clean({"input_ids": input_ids, "instructs": instructs, "images": images,
                     "image_sizes": torch.tensor([list(s) for s in image_sizes], dtype=torch.long)}),
              os.path.join(out_dir, "inputs.safetensors"))
    save_file(clean(inter), os.path.join(out_dir, "intermediates.safetensors"))
    save_file(clean(outputs), os.path.join(out_dir, "outputs.safetensors"))

    if not args.no_copy:
        for f in ["config.json", "vision_config.json", "model.safetensors"]:
            if os.path.abspath(os.path.join(ckpt, f)) != os.path.join(out_dir, f):
                shutil.copyfile(os.path.join(ckpt, f), os.path.join(out_dir, f))
        if os.path.abspath(os.path.join(ckpt, "tokenizer")) != os.path.join(out_dir, "tokenizer"):
            shutil.copytree(os.path.join(ckpt, "tokenizer"), os.path.join(out_dir, "tokenizer"), dirs_exist_ok=True)
        if os.path.abspath(image_path) != os.path.join(out_dir, "image.png"):
            shutil.copyfile(image_path, os.path.join(out_dir, "image.png"))
        with open(os.path.join(out_dir, "state_dict_keys.txt"), "w") as f:
            for k, v in main_sd.items():
                f.write(f"{k}\t{list(v.shape)}\t{v.dtype}\n")

    special = {tokenizer.convert_ids_to_tokens(i): i for i in tokenizer.all_special_ids}
    for t in tokenizer.get_added_vocab():
        special[t] = tokenizer.convert_tokens_to_ids(t)
    prefix_counts = {}
    for k in main_sd:
        p = ".".join(k.split(".")[:2]) if k.startswith("model.") else k.split(".")[0]
        prefix_counts[p] = prefix_counts.get(p, 0) + 1
    fields = ["mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer",
              "mm_vision_select_feature", "mm_patch_merge_type", "mm_use_im_start_end", "mm_use_im_patch_token",
              "unfreeze_mm_vision_tower", "use_mm_proj", "image_aspect_ratio", "window_size", "query_len",
              "num_of_vision_sampler_layers", "start_of_vision_sampler_layers", "stride_of_vision_sampler_layers",
              "tokenizer_model_max_length", "tokenizer_padding_side"]
    llm_fields = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling",
                  "max_position_embeddings", "original_max_position_embeddings", "sliding_window",
                  "tie_word_embeddings", "attention_bias", "mlp_bias", "vocab_size"]
    nsamp = cfg["num_of_vision_sampler_layers"]
    meta = {
        "generator": "UNMODIFIED upstream FUSION (github.com/starriver030515/FUSION @ %s) via /tmp/upstream_golden/run_upstream.py"
                     % open("/tmp/upstream_golden/UPSTREAM_COMMIT").read().strip(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__},
        "seed": args.seed,
        "dtype": "float32",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": log["attn_implementation"],
        "conv_mode": conv_mode,
        "prompt": prompt,
        "question": args.question,
        "instruct_text": tokenizer.decode(instructs[0]),
        "special_token_ids": special,
        "placeholder_ids": {"IMAGE_TOKEN_INDEX": IMAGE_TOKEN_INDEX, "LATENT_IMAGE_TOKEN_INDEX": LATENT_IMAGE_TOKEN_INDEX},
        "input_ids_len": int(input_ids.shape[1]),
        "query_len": args.query_len,
        "config_query_len": cfg["query_len"],
        "extra_query_lens": extra,
        "expanded_seq_len": prefill["seq_len"],
        "instruct_pos": inter_all["instruct_pos"].tolist(),
        "vision_pos_first_last": [int(inter_all["vision_pos"][0, 0]), int(inter_all["vision_pos"][0, -1])],
        "generated_ids": generated_ids.tolist(),
        "generated_text": tokenizer.decode(generated_ids[0]),
        "greedy_top1_minus_top2_margins": margins,
        "smallest_margin": min(margins),
        "image_sha256": hashlib.sha256(open(image_path, "rb").read()).hexdigest(),
        "image_size_wh": list(image_sizes[0]),
        "interaction_after_decoder_layers": [cfg["start_of_vision_sampler_layers"] + i * cfg["stride_of_vision_sampler_layers"]
                                             for i in range(nsamp)],
        "vision_tower_config": {k: vc.get(k) for k in ["hidden_size", "intermediate_size", "num_hidden_layers",
                                                       "num_attention_heads", "num_channels", "image_size",
                                                       "patch_size", "hidden_act", "layer_norm_eps"]},
        "llm_config": {k: cfg[k] for k in llm_fields if k in cfg},
        "fusion_config": {k: cfg.get(k) for k in fields},
        "generate_kwargs": {"do_sample": False, "num_beams": 1, "max_new_tokens": args.max_new_tokens,
                            "use_cache": True, "eos_token_id": None},
        "runtime_patches": patches,
        "runtime_config_override": "model.config.query_len = str(query_len) before each generate (upstream draws "
                                   "random.choice(query_len.split(',')) per call); restored afterwards",
        "state_dict_prefix_counts": prefix_counts,
        "load_checks": log,
        "instrumentation": instrumentation,
        "files": {
            "model.safetensors": "model.state_dict() with exact upstream key names",
            "config.json": "Fusion config as saved by upstream/transformers save_pretrained",
            "vision_config.json": "the tiny tower's shape",
            "inputs.safetensors": "input_ids (with -200 <image>, -300 <latent_image>), instructs, images (1,5,3,384,384), image_sizes",
            "outputs.safetensors": "prefill forward logits, decoder hidden states, generated ids, per-step generate logits, "
                                   "logits_query_len_{q} for the extra query lengths",
            "intermediates.safetensors": "outputs of prepare_inputs_labels_for_multimodal / encode_images (subset)",
            "tokenizer/": "tiny byte-level tokenizer",
            "image.png": "source image",
        },
    }
    if os.path.exists(os.path.join(ckpt, "init.json")):
        meta["checkpoint_creation"] = dict(json.load(open(os.path.join(ckpt, "init.json"))),
                                           script="/tmp/upstream_golden/make_checkpoint.py (upstream model class "
                                                  "constructed from config, re-initialised, save_pretrained)")
    meta["files"]["intermediates.safetensors"] += ": " + ", ".join(sorted(inter))
    if keep is not None:
        meta["files"]["intermediates.safetensors"] += " (trimmed; hidden_states_0 equals inputs_embeds)"
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps({"generated_ids": meta["generated_ids"], "margins": margins,
                      "expanded_seq_len": prefill["seq_len"], "instrumentation": instrumentation}, indent=None))


if __name__ == "__main__":
    main()
