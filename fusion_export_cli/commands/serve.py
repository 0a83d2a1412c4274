"""`fusion-export serve FOLDER`: an OpenAI-compatible chat-completions server for a checkpoint, an artifact or an
engine folder, on 127.0.0.1 unless told otherwise.

    fusion-export serve art --port 8000
    curl http://127.0.0.1:8000/v1/models

Requests queue; those waiting when a batch starts share its decode steps (up to the folder's batch limit). Limits:
--max-tokens (new tokens per request), --max-image-pixels, --max-image-bytes, --max-body-bytes, --max-queue (then
429 with Retry-After), --request-timeout. --api-key-file FILE (or the FUSION_API_KEY environment variable) requires
`Authorization: Bearer KEY` on /v1 routes. Images come as data: URLs; local files only from under
--allow-images-from DIR; http(s) URLs are refused (the server makes no outbound connection). SIGTERM or Ctrl-C:
no new connections, requests in flight finish within --shutdown-timeout, then exit 0. A checkpoint folder runs on
the PyTorch reference, or with `--backend torch` on the torch backend (--dtype, --device, --max-context,
--torch-kernels, --cuda-graph, --torch-compile; docs/torch-backend.md).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from reference_model.errors import FusionError

from ..options import Dtype, add_query_len_option, add_torch_options, max_new_tokens

TORCH_FLAGS = ("dtype", "device", "max_context", "torch_kernels", "cuda_graph", "torch_compile")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("folder", metavar="FOLDER", help="checkpoint, artifact or engine folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-id", help="the model's name in the API (default: the folder's name)")
    p.add_argument("--api-key-file", type=Path, metavar="FILE", help="require this key (FUSION_API_KEY also works)")
    p.add_argument("--allow-images-from", type=Path, metavar="DIR", help="local image files may be read from here")
    p.add_argument("--max-tokens", type=max_new_tokens, default=1024, metavar="N", help="new tokens per request")
    p.add_argument("--max-image-pixels", type=_positive, default=None, metavar="N")
    p.add_argument("--max-image-bytes", type=_positive, default=20_000_000, metavar="N")
    p.add_argument("--max-body-bytes", type=_positive, default=30_000_000, metavar="N")
    p.add_argument("--max-queue", type=_positive, default=16, metavar="N", help="requests waiting before 429")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="S")
    p.add_argument("--batch-window-ms", type=float, default=50.0, metavar="MS",
                   help="how long a batch waits for more requests after its first (default 50)")  # fmt: skip
    p.add_argument("--conversation-cache-mb", type=float, default=512.0, metavar="MB",
                   help="KV columns kept so a conversation's next turn prefills only its own tokens (0: keep none; "
                        "a turn whose earlier turns are not kept is recomputed)")  # fmt: skip
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S")
    add_query_len_option(p, note="; exported graphs fix their own")
    p.add_argument("--backend", choices=["torch"], help="a checkpoint folder on the torch backend (default: reference)")
    p.add_argument("--dtype", type=Dtype, choices=list(Dtype), help="torch: weight dtype (default fp32)")
    p.add_argument("--device", help="torch: torch device (default cpu)")
    add_torch_options(p)
    p.set_defaults(run=run)


def backend_options(args: argparse.Namespace, folder: Path):
    """The backend and its options from the flags: the torch backend's flags only with --backend torch, and that
    only for a checkpoint folder. A server's memory must stay flat across batch shapes: ONNX Runtime's vision and
    prefill run without an arena."""
    from engines.backends import BackendKind, BackendOptions, kind_of_folder

    if args.backend is None:
        given = [flag for flag in TORCH_FLAGS if getattr(args, flag) is not None]
        if given:
            raise FusionError(f"--{given[0].replace('_', '-')} applies to --backend torch")
        return None, BackendOptions(ort_prefill_arena=False)
    if kind_of_folder(folder) is not BackendKind.reference:
        raise FusionError(f"--backend torch runs a checkpoint folder (config.json); {folder} is not one")
    options = BackendOptions(dtype=args.dtype.value if args.dtype else None, device=args.device,
                             max_context=args.max_context, kernels=args.torch_kernels, cuda_graph=args.cuda_graph,
                             compiled=args.torch_compile)  # fmt: skip
    return BackendKind.torch, options


def run(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise FusionError(f"serve needs the Python modules {missing}: pip install 'fusion-export[serve]'")
    import uvicorn

    from engines.pipeline import Pipeline
    from reference_model.image_preprocessing import DEFAULT_MAX_IMAGE_PIXELS

    from ..server.app import ServerSettings, create_app
    from ..server.chat import Limits

    key = os.environ.get("FUSION_API_KEY")
    if args.api_key_file is not None:
        try:
            key = args.api_key_file.read_text().strip()
        except OSError as e:
            raise FusionError(f"--api-key-file {args.api_key_file}: {e.strerror}") from None
        if not key:
            raise FusionError(f"--api-key-file {args.api_key_file}: empty")
    folder = Path(args.folder)
    if args.allow_images_from is not None and not args.allow_images_from.is_dir():
        raise FusionError(f"--allow-images-from {args.allow_images_from}: not a folder")
    pixels = args.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS
    print(f"loading {folder} ...", file=sys.stderr, flush=True)
    backend, options = backend_options(args, folder)
    pipeline = Pipeline.open(folder, backend, options, query_len=args.query_len, max_image_pixels=pixels)
    follow_up_decoder = getattr(pipeline.backend, "follow_up_decoder", None)
    if follow_up_decoder is not None:  # ONNX Runtime: made now, not while a conversation's request waits for it
        try:
            follow_up_decoder()
        except FusionError as e:  # first turns are still served; a later turn is refused with this reason (400)
            print(f"note: a conversation's later turns cannot be served: {e}", file=sys.stderr, flush=True)
    limits = Limits(max_tokens=args.max_tokens, max_image_bytes=args.max_image_bytes,
                    image_folder=args.allow_images_from)  # fmt: skip
    settings = ServerSettings(model_id=args.model_id or folder.resolve().name, limits=limits, api_key=key,
                              max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                              request_timeout_s=args.request_timeout,
                              batch_window_s=args.batch_window_ms / 1000,
                              conversation_bytes=int(args.conversation_cache_mb * (1 << 20)))  # fmt: skip
    app = create_app(pipeline, settings)
    print(f"serving {pipeline.describe()} as {settings.model_id!r} on http://{args.host}:{args.port}",
          file=sys.stderr, flush=True)  # fmt: skip
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.shutdown_timeout)  # fmt: skip
    server = uvicorn.Server(config)
    # uvicorn takes SIGINT/SIGTERM for a graceful shutdown and re-raises them when done: by then the shutdown was
    # the command's normal end, so the CLI's own handlers must not turn it into an interruption
    quiet = {s: signal.signal(s, lambda *a: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for s, handler in quiet.items():
            signal.signal(s, handler)
    if not server.started:
        raise FusionError(f"could not serve on {args.host}:{args.port} (is the port in use?)")
    return 0
