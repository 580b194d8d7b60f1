"""`fusesteer generate`: stream a steered (or plain) generation to stdout."""

from __future__ import annotations

import argparse
import math
import sys

from ..errors import FuseSteerError

BACKEND_CHOICES = ["auto", "torch", "triton", "fold", "reference"]


def control_vector_arg(value: str) -> tuple[str, float]:
    """FILE[:SCALE] -> (FILE, SCALE). The suffix is a scale only if it parses as a finite number."""
    path, sep, tail = value.rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            return value, 1.0
        if not math.isfinite(scale):
            raise argparse.ArgumentTypeError(f"scale in {value!r} must be finite")
        return path, scale
    return value, 1.0



def _wrap(text: str) -> str:
    import textwrap

    return textwrap.fill(text, 96)


def register(sub, fmt):
    p = sub.add_parser(
        "generate", formatter_class=fmt, help="generate text with a plan or GGUF control vectors attached",
        description=_wrap("Load a model, attach a steering plan (fusesteer .safetensors, or .gguf) or one or more GGUF "
                    "control vectors (summed, each with its own scale, like llama.cpp's --control-vector-scaled), "
                    "and stream the generated tokens to stdout. Greedy decoding unless --temperature > 0."),
        epilog="examples:\n"
               "  fusesteer generate --model smollm2-135m --plan caa.safetensors --prompt 'Tell me about cats' --chat\n"
               "  fusesteer generate --model smollm2-135m --control-vector happy.gguf:0.8 --control-vector "
               "calm.gguf:-0.3 \\\n      --layer-range 10 20 --prompt 'Today I feel' --max-new-tokens 40")
    p.add_argument("--model", default="smollm2-135m", metavar="NAME_OR_PATH",
                   help="embedded model name or local Hugging Face folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--plan", default=None, metavar="FILE", help="a fusesteer plan (.safetensors) or a .gguf")
    src.add_argument("--control-vector", dest="control_vectors", action="append", type=control_vector_arg,
                     default=None, metavar="FILE[:SCALE]",
                     help="GGUF control vector with an optional scale (default 1); repeatable, vectors are summed")
    p.add_argument("--layer-range", type=int, nargs=2, metavar=("START", "END"), default=None,
                   help="steer only layers START..END, both inclusive (llama.cpp --control-vector-layer-range)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="extra multiplier for --plan, or for every --control-vector (on top of its own scale)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the forward (fullgraph, static KV cache; CUDA graphs on a GPU); the first "
                        "tokens wait for the compiler")
    p.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _encode(tok, prompt: str, chat: bool):
    if chat:
        if not getattr(tok, "chat_template", None):
            raise FuseSteerError("--chat: this model's tokenizer has no chat template; drop --chat")
        enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
    else:
        enc = tok(prompt, return_tensors="pt")
    if enc["input_ids"].shape[1] == 0:
        raise FuseSteerError("the prompt encodes to zero tokens")
    return enc


def run(args) -> int:
    import torch
    from transformers import TextStreamer

    from .. import models
    from ..interop.gguf_cv import read_control_vectors
    from ..runtime.attach import attach
    from ..runtime.plan import ModelSpec
    from .plan import load_plan_file

    if not math.isfinite(args.scale):
        raise FuseSteerError(f"--scale must be finite, got {args.scale}")
    if args.max_new_tokens < 1:
        raise FuseSteerError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not math.isfinite(args.temperature):
        raise FuseSteerError(f"--temperature must be >= 0, got {args.temperature}")
    if args.layer_range and not (args.plan or args.control_vectors):
        raise FuseSteerError("--layer-range needs --plan or --control-vector")

    model, tok = models.load(args.model, dtype=args.dtype)
    spec = ModelSpec.from_model(model)
    rng = tuple(args.layer_range) if args.layer_range else None
    plan = None
    if args.control_vectors:
        files = [(path, scale * args.scale) for path, scale in args.control_vectors]
        plan = read_control_vectors(files, spec, layer_range=rng)
    elif args.plan:
        plan = load_plan_file(args.plan, spec, scale=args.scale, layer_range=rng)

    enc = _encode(tok, args.prompt, args.chat)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    gen_kw = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id,
                  streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True))
    if args.temperature > 0:
        torch.manual_seed(args.seed)
        gen_kw.update(do_sample=True, temperature=args.temperature)
    else:
        gen_kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)

    if plan is None:
        print(f"fusesteer: {args.model}, no steering", file=sys.stderr, flush=True)
        with torch.no_grad():
            _generate(model, enc, gen_kw, args)
        return 0
    layers = sorted({e.layer for e in plan.entries})
    print(f"fusesteer: {args.model}, plan {plan.name!r}: {len(plan.entries)} entries on layers "
          f"{layers[0]}..{layers[-1]}, backend {args.backend}" if layers else
          f"fusesteer: {args.model}, plan {plan.name!r} is empty", file=sys.stderr, flush=True)
    with attach(model, plan, backend=args.backend), torch.no_grad():
        _generate(model, enc, gen_kw, args)
    return 0


def _generate(model, enc, gen_kw, args):
    """generate(), with --compile: the (steered) forward compiled once, fullgraph, on a static KV cache."""
    if not args.compile:
        return model.generate(**enc, **gen_kw)
    import torch

    mode = "reduce-overhead" if model.device.type == "cuda" else None
    model.forward = torch.compile(model.forward, backend=args.compile_backend, mode=mode, fullgraph=True,
                                  dynamic=False)
    try:
        return model.generate(**enc, cache_implementation="static", **gen_kw)
    finally:
        del model.forward
