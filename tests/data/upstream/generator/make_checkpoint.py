#!/usr/bin/env python
"""Create a tiny random FUSION checkpoint WITH UPSTREAM'S OWN MODEL CLASSES and save it with
transformers' save_pretrained (safetensors), so config fields and key names are upstream's exactly.

Init (seeded torch.Generator, parameters in named_parameters() order):
  biases                       0.02 * randn
  1-D weights (RMSNorm/LayerNorm scales)  1 + 0.1 * randn
  embed_tokens / position_embedding       randn
  other matrices / conv kernels           randn / sqrt(fan_in)   (fan_in = prod(shape[1:]))
"""
import argparse
import copy
import json
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import upstream_env  # noqa: E402
from upstream_env import patch_siglip_defaults, make_tower_folder, tower_kind, fusion_classes, load_file  # noqa: E402
import torch  # noqa: E402

ORACLE = "/work/shared/oracle"
TOWER_COMMON = {"num_channels": 3, "image_size": 384, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-06}

VARIANTS = {
    "x-phi": {
        "template": "fusion-phi-tiny",
        "config": {
            "hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2, "num_hidden_layers": 5,
            "intermediate_size": 192,
            "rope_scaling": {"type": "longrope",
                             "long_factor": [round(1.0 + 0.75 * i, 4) for i in range(8)],
                             "short_factor": [round(1.0 + 0.05 * i, 4) for i in range(8)]},
            "vocab_size": 266,
            "mm_vision_tower": "google/siglip2-giant-opt-patch16-384",
            "mm_hidden_size": 48,
            "num_of_vision_sampler_layers": 2, "start_of_vision_sampler_layers": 0,
            "stride_of_vision_sampler_layers": 2,
            "query_len": "16,36",
        },
        "tower": dict(TOWER_COMMON, hidden_size=48, intermediate_size=96, num_hidden_layers=40, num_attention_heads=4,
                      patch_size=16,
                      note="40 layers as saved by the tower; FUSION removes the last one, so 39 run (upstream hard-codes "
                           "layers 0..18 as 'early' and 576 = 24x24 patches). Upstream reads this shape with "
                           "SigLip2VisionConfig.from_pretrained(mm_vision_tower); real checkpoints carry no vision config."),
    },
    "llama-so400m": {
        "template": "fusion-x-llama-tiny",
        "config": {
            "hidden_size": 192, "num_attention_heads": 12, "num_key_value_heads": 3, "head_dim": 16,
            "num_hidden_layers": 4, "intermediate_size": 320,
            "rope_theta": 500000.0,
            "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "tie_word_embeddings": False,
            "vocab_size": 265,
            "mm_vision_tower": "google/siglip-so400m-patch14-384",
            "mm_hidden_size": 48,
            "num_of_vision_sampler_layers": 2, "start_of_vision_sampler_layers": 1,
            "stride_of_vision_sampler_layers": 2,
            "query_len": "4,16",
        },
        "tower": dict(TOWER_COMMON, hidden_size=48, intermediate_size=96, num_hidden_layers=27, num_attention_heads=4,
                      patch_size=14,
                      note="27 layers as saved by SigLIP; FUSION removes the last one, so 26 run (upstream hard-codes "
                           "layers 0..12 as 'early' and 729 = 27x27 patches). Upstream takes this shape from "
                           "SigLipVisionConfig() class defaults (so400m hard-coded); real checkpoints carry no vision config."),
    },
}


def reinit(model, seed):
    g = torch.Generator().manual_seed(seed)
    counts = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if name.endswith(".bias"):
                v, kind = 0.02 * torch.randn(shape, generator=g), "bias"
            elif p.ndim == 1:
                v, kind = 1.0 + 0.1 * torch.randn(shape, generator=g), "norm"
            elif "embed_tokens" in name or "position_embedding" in name:
                v, kind = torch.randn(shape, generator=g), "embedding"
            else:
                fan_in = math.prod(shape[1:])
                v, kind = torch.randn(shape, generator=g) / math.sqrt(fan_in), "matrix"
            p.copy_(v.to(p.dtype))
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args()
    V = VARIANTS[args.variant]
    out = os.path.abspath(args.out)
    workdir = os.path.abspath(args.workdir)
    tmpl = json.load(open(os.path.join(ORACLE, V["template"], "config.json")))
    for k in ["_attn_implementation_autoset", "transformers_version"]:
        tmpl.pop(k, None)
    cfgd = copy.deepcopy(tmpl)
    cfgd.update(copy.deepcopy(V["config"]))
    Model, Cfg, _ = fusion_classes(cfgd["model_type"])
    cfgd.pop("model_type")
    config = Cfg(**cfgd)
    vc = V["tower"]
    assert tower_kind(config.mm_vision_tower) == ("siglip2" if vc["patch_size"] == 16 else "siglip")
    if tower_kind(config.mm_vision_tower) == "siglip":
        patch_siglip_defaults(vc)
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)
    make_tower_folder(workdir, config.mm_vision_tower, vc, None, seed=args.seed)

    torch.manual_seed(args.seed)
    model = Model(config)  # upstream constructor: builds + loads the tower (unfreeze_mm_vision_tower=True)
    model.to(torch.float32)
    counts = reinit(model, args.seed)
    if os.path.exists(out):
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    sd = load_file(os.path.join(out, "model.safetensors"))
    msd = model.state_dict()
    assert set(sd) == set(msd), (set(sd) ^ set(msd))
    for k in sd:
        assert torch.equal(sd[k], msd[k]), k
    with open(os.path.join(out, "vision_config.json"), "w") as f:
        order = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                 "image_size", "patch_size", "hidden_act", "layer_norm_eps", "note"]
        json.dump({k: vc[k] for k in order}, f, indent=1)
    tok_src = os.path.join(ORACLE, V["template"], "tokenizer")
    shutil.copytree(tok_src, os.path.join(out, "tokenizer"))
    with open(os.path.join(out, "init.json"), "w") as f:
        json.dump({"variant": args.variant, "seed": args.seed, "template": V["template"], "init_counts": counts,
                   "init": __doc__.strip()}, f, indent=1)
    print(args.variant, "params", sum(p.numel() for p in model.parameters()), "keys", len(sd), counts)


if __name__ == "__main__":
    main()
