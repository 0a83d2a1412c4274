"""Shared helpers: make the UNMODIFIED upstream FUSION code importable and runnable on CPU/float32.

Nothing here changes model math. The only runtime patches are:
  * SigLipVisionConfig.__init__.__defaults__ (so400m tower): upstream builds the tower config with
    `SigLipVisionConfig()` (class defaults = real so400m), so a toy-width tower is only expressible by
    changing those defaults.
  * a local folder named exactly like `mm_vision_tower` (relative to the working directory) holding a tiny
    tower checkpoint (config.json + model.safetensors), because upstream calls
    `SigLip[2]VisionModel.from_pretrained(mm_vision_tower)` inside the model constructor
    (unfreeze_mm_vision_tower=True) and, for SigLIP2, `SigLip2VisionConfig.from_pretrained(mm_vision_tower)`.
    Those tower weights are overwritten by the main checkpoint (verified after load), except the last
    encoder layer which upstream deletes (`del encoder.layers[-1:]`) and the pooling head which upstream
    replaces by nn.Identity.
"""
import os
import sys
import json

UPSTREAM = "/tmp/upstream_golden/FUSION"
if UPSTREAM not in sys.path:
    sys.path.insert(0, UPSTREAM)

import torch

torch.set_num_threads(int(os.environ.get("UPSTREAM_THREADS", "1")))
torch.set_num_interop_threads(1)

from safetensors.torch import load_file, save_file  # noqa: E402

from fusion.model.multimodal_encoder import siglip_encoder, siglip2_encoder  # noqa: E402

SIGLIP_DEFAULT_ORDER = [
    "hidden_size", "image_mean", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout",
]
_ORIG_SIGLIP_DEFAULTS = siglip_encoder.SigLipVisionConfig.__init__.__defaults__
TOWER_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
              "image_size", "patch_size", "hidden_act", "layer_norm_eps"]


def tower_kind(mm_vision_tower):
    # same test as fusion/model/multimodal_encoder/builder.py
    n = mm_vision_tower.lower()
    if "siglip2" in n:
        return "siglip2"
    if "siglip" in n:
        return "siglip"
    raise ValueError(mm_vision_tower)


def patch_siglip_defaults(vc):
    """Set SigLipVisionConfig() class defaults to the tiny tower (upstream has no other way)."""
    d = dict(zip(SIGLIP_DEFAULT_ORDER, _ORIG_SIGLIP_DEFAULTS))
    before = dict(d)
    for k in TOWER_KEYS + ["attention_dropout"]:
        if k in vc:
            d[k] = vc[k]
    siglip_encoder.SigLipVisionConfig.__init__.__defaults__ = tuple(d[k] for k in SIGLIP_DEFAULT_ORDER)
    return {"target": "fusion.model.multimodal_encoder.siglip_encoder.SigLipVisionConfig.__init__.__defaults__",
            "before": {k: before[k] for k in TOWER_KEYS + ["attention_dropout"]},
            "after": {k: d[k] for k in TOWER_KEYS + ["attention_dropout"]}}


def make_tower_folder(workdir, mm_vision_tower, vc, main_sd=None, seed=0):
    """Create <workdir>/<mm_vision_tower>/ with a tiny tower checkpoint (saved by upstream's own tower class).

    Weights: taken from the main checkpoint where present (so even before the main load they match); the
    extra last layer (deleted by upstream) is a copy of the previous layer. Saved with save_pretrained."""
    kind = tower_kind(mm_vision_tower)
    mod = siglip2_encoder if kind == "siglip2" else siglip_encoder
    Cfg = mod.SigLip2VisionConfig if kind == "siglip2" else mod.SigLipVisionConfig
    Model = mod.SigLip2VisionModel if kind == "siglip2" else mod.SigLipVisionModel
    kw = {k: vc[k] for k in TOWER_KEYS}
    kw["attention_dropout"] = vc.get("attention_dropout", 0.0)
    cfg = Cfg(**kw)
    torch.manual_seed(seed)
    m = Model(cfg)
    sd = m.state_dict()
    if main_sd is not None:
        pre = "model.vision_tower.vision_tower."
        nl = vc["num_hidden_layers"]
        for k in list(sd.keys()):
            src = pre + k
            if src not in main_sd:
                src = src.replace(f"encoder.layers.{nl - 1}.", f"encoder.layers.{nl - 2}.")
            if src in main_sd:
                sd[k] = main_sd[src].clone()
        m.load_state_dict(sd)
    path = os.path.join(workdir, mm_vision_tower)
    os.makedirs(path, exist_ok=True)
    m.save_pretrained(path, safe_serialization=True)
    return path


def fusion_classes(model_type):
    from fusion.model.language_model.fusion_phi import FusionPhiForCausalLM, FusionPhiConfig
    from fusion.model.language_model.fusion_llama import FusionLlamaForCausalLM, FusionConfig
    if model_type == "fusion_phi":
        return FusionPhiForCausalLM, FusionPhiConfig, "phi_3"
    if model_type == "fusion_llama":
        return FusionLlamaForCausalLM, FusionConfig, "llama_3"
    raise ValueError(model_type)
