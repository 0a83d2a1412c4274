"""`python -m benchmarks.family_plans`: the device-memory plan of every full-size FUSION member in fp16, INT8
weight-only and INT4 on each Jetson preset, from the configs alone (what `fusion-export build --dry-run --preset
NAME --precision P --trt-target trt-10.15 --device-memory DEVICE` prints cell by cell), as one markdown table."""

from __future__ import annotations

import argparse

from engines.tensorrt.plan import GB, BuildLimits, parse_device_memory, plan_source
from engines.tensorrt.planned_export import PlannedExport, planned_source
from reference_model import FusionConfig, preset_config
from reference_model.errors import FusionError

MEMBERS = ("fusion-phi3.5-3b", "fusion-x-phi3.5-3b", "fusion-llama3.1-8b", "fusion-x-llama3.1-8b")
PRECISIONS = ("fp16", "int8-weight-only", "int4")
DEVICES = ("orin-nano-8", "orin-nx-16", "agx-orin-64")


def largest_context(config: FusionConfig, quantization: str | None, target: str, device: str) -> int | None:
    """The largest KV capacity that fits `device` (any plan that fits reports it: the shortest context's)."""
    shortest = config.vision.num_patches + config.default_query_len + 2
    export = PlannedExport(precision="fp16", quantization=quantization, target=target, max_context=shortest)
    try:
        plan = plan_source(planned_source(config, export), BuildLimits(max_context=shortest),
                           parse_device_memory(device))  # fmt: skip
    except FusionError as refused:
        if not str(refused).startswith("--device-memory:"):  # only "it does not fit" is an answer here
            raise
        return None
    return plan.largest_context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", default="trt-10.15", help="export --trt-target (default trt-10.15)")
    parser.add_argument("--context", type=int, default=4096, help="KV capacity for the weights/KV columns (4096)")
    args = parser.parse_args()
    print(f"| member | weights | weights on device | KV cache at {args.context} | " + " | ".join(DEVICES) + " |")
    print("| --- " * (4 + len(DEVICES)) + "|")
    for member in MEMBERS:
        config = preset_config(member)
        for precision in PRECISIONS:
            quantization = None if precision == "fp16" else precision
            export = PlannedExport(precision="fp16", quantization=quantization, target=args.target,
                                   max_context=args.context)  # fmt: skip
            plan = plan_source(planned_source(config, export), BuildLimits(max_context=args.context))
            cells = [largest_context(config, quantization, args.target, device) for device in DEVICES]
            print(f"| {member} | {precision} | {plan.memory['weights'] / GB:.2f} GB | "
                  f"{plan.memory['kv_cache'] / GB:.2f} GB | "
                  + " | ".join(f"{c:,}" if c else "does not fit" for c in cells) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
