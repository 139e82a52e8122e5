"""The ``onnxpress`` command: export | inspect | compile | eval | generate.

Every user error is printed as one line (``onnxpress: error: ...``) with exit code
2; no traceback, and no output file unless the command succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from onnxpress.errors import OnnxpressError

EXPORT_EXAMPLES = """examples:
  onnxpress export minilm -o build/minilm/           # the packaged all-MiniLM-L6-v2
  onnxpress export smollm2 -o build/smollm2/         # the packaged SmolLM2-135M (GGUF -> HF -> ONNX, with KV cache)
  onnxpress export path/to/hf_model_dir -o out/
  onnxpress export smollm2 -o build/smollm2-fp16/ --dtype fp16   # half precision, KV cache included
"""
INSPECT_EXAMPLES = """examples:
  onnxpress inspect build/minilm/model.onnx
  onnxpress inspect build/smollm2/model.onnx --json | jq '.layers[0]'
"""
COMPILE_EXAMPLES = """examples:
  onnxpress compile build/minilm/model.onnx -o out/minilm.onnx --recipe lossless
  onnxpress compile build/minilm/model.onnx -o out/minilm.onnx --calib sotu    # default recipe: balanced
  onnxpress compile build/minilm/model.onnx -o out/minilm.onnx --recipe small --calib sotu
  onnxpress compile build/minilm/model.onnx -o out/minilm.onnx --budget 0.01 --objective latency --calib sotu
  onnxpress compile model.onnx -o out.onnx --passes cleanup prune_heads:fraction=0.33 --calib calib.npz
  onnxpress compile model.onnx -o out.onnx --recipe my_recipe.yaml --calib texts.jsonl --tokenizer hf_dir/
The report is written beside the model as OUT.report.json.
"""
EVAL_EXAMPLES = """examples:
  onnxpress eval out/minilm.onnx --reference build/minilm/model.onnx --probe
  onnxpress eval out/smollm2.onnx --reference build/smollm2/model.onnx --json
"""

GENERATE_EXAMPLES = """examples:
  onnxpress generate out/smollm2.onnx --prompt "The state of the Union is"
  onnxpress generate out/smollm2.onnx --prompt "Once upon a time" --max-new-tokens 100 --sample --temperature 0.8 --top-p 0.95 --seed 1
  onnxpress generate model.onnx --prompt "Hello" --tokenizer hf_dir/ --threads 2
Prints the new text, then the prompt and new token counts, prefill ms and decode tokens/s.
"""
SAMPLING_OPTIONS = ("temperature", "top_k", "top_p", "seed")


def _parser() -> argparse.ArgumentParser:
    from onnxpress import __version__

    parser = argparse.ArgumentParser(prog="onnxpress", description="Compress transformer ONNX models without retraining.")
    parser.add_argument("--version", action="version", version=f"onnxpress {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("export", help="export a Hugging Face model to ONNX", epilog=EXPORT_EXAMPLES, formatter_class=fmt)
    p.add_argument("source", help="HF model folder, or a packaged model name: minilm, smollm2")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--task", help="optimum task (default: feature-extraction for encoders, text-generation-with-past for decoders)")
    p.add_argument("--opset", type=int)
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                   help="fp16: a half-precision model (weights, activations, inputs and outputs)")

    p = sub.add_parser("inspect", help="print the transformer map of an ONNX model", epilog=INSPECT_EXAMPLES, formatter_class=fmt)
    p.add_argument("model", help=".onnx file")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser("compile", help="run compression passes", epilog=COMPILE_EXAMPLES, formatter_class=fmt)
    p.add_argument("model", help=".onnx file")
    p.add_argument("-o", "--output", required=True, help="output .onnx file (its report goes beside it)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--recipe", help="packaged recipe (lossless, balanced, small, edge-int4) or a YAML file "
                       "(default: balanced; lossless when no --calib is given)")
    group.add_argument("--passes", nargs="+", metavar="PASS[:key=value,...]", help="passes to run, in order")
    group.add_argument("--budget", type=float, metavar="LOSS",
                       help="search pass strengths for the best model within this fidelity loss on held-out "
                       "calibration data (1 - cosine for encoders, relative perplexity increase for decoders), e.g. 0.01")
    p.add_argument("--objective", choices=["latency", "size"], default="latency",
                   help="what --budget minimises (default: latency)")
    p.add_argument("--search-seconds", type=float, default=1800.0, metavar="S",
                   help="--budget: stop probing after this wall time and keep the best found (default: 1800)")
    p.add_argument("--calib", nargs="+", metavar="PATH",
                   help="calibration data: text/JSONL files or folders, one .npz, or shared data by name: sotu, bbc, "
                   "default (both; every compile is also measured on the corpus its calibration did not use)")
    p.add_argument("--tokenizer", help="tokenizer folder for text calibration (default: the model's folder)")
    p.add_argument("--max-samples", type=int, help="calibration samples to use")
    p.add_argument("--seq-len", type=int, help="calibration sequence length (tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")
    p.add_argument("--external-data", action=argparse.BooleanOptionalAction, default=None,
                   help="store weights in OUT.onnx.data (default: for decoders with a KV cache, whose runtime "
                   "files compile writes: ONNX Runtime maps them instead of copying; and beyond 2 GB)")
    p.add_argument("--no-verify", action="store_true", help="skip the per-stage checks (not recommended)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("eval", help="measure a model's fidelity against a reference", epilog=EVAL_EXAMPLES, formatter_class=fmt)
    p.add_argument("model", help=".onnx file")
    p.add_argument("--reference", help="reference .onnx (usually the uncompressed export)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's or reference's folder)")
    p.add_argument("--text", nargs="+", help="evaluation text files (default: the held-out SOTU split)")
    p.add_argument("--probe", action="store_true", help="also run the BBC-news classification probe (encoders)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("generate", help="generate text with a decoder (greedy, or sampled)", epilog=GENERATE_EXAMPLES,
                       formatter_class=fmt)
    p.add_argument("model", help=".onnx decoder (with or without a KV cache)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate at most (default: 64)")
    p.add_argument("--sample", action="store_true", help="sample the tokens instead of taking the most likely")
    p.add_argument("--temperature", type=float, metavar="T", help="--sample: divide the logits by T (default: 1)")
    p.add_argument("--top-k", type=int, metavar="K", help="--sample: draw from the K most likely tokens only")
    p.add_argument("--top-p", type=float, metavar="P", help="--sample: draw from the fewest tokens whose probability sums to P")
    p.add_argument("--seed", type=int, metavar="S", help="--sample: random seed, for reproducible samples")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's folder)")
    return parser


def _cmd_export(args) -> int:
    from onnxpress.export import export_model, resolve_model_source

    path = export_model(resolve_model_source(args.source), args.output, task=args.task, opset=args.opset,
                        dtype=args.dtype)
    print(f"exported {args.source} -> {path}")
    return 0


def _cmd_inspect(args) -> int:
    from onnxpress.analysis import analyze
    from onnxpress.model_io import load_model

    tmap = analyze(load_model(args.model))
    print(json.dumps(tmap.to_dict(), indent=2) if args.json else tmap.format_table())
    return 0


def _cmd_compile(args) -> int:
    from onnxpress.compile import compile_model, report_path

    report = compile_model(
        args.model,
        args.output,
        recipe=args.recipe,
        passes=args.passes,
        calib=args.calib,
        tokenizer_dir=args.tokenizer,
        max_samples=args.max_samples,
        max_length=args.seq_len,
        seed=args.seed,
        threads=args.threads,
        verify=not args.no_verify,
        external_data=args.external_data,
        progress=not args.quiet and sys.stderr.isatty(),
        budget=args.budget,
        objective=args.objective,
        search_seconds=args.search_seconds,
    )
    print(report.format_table())
    print(f"report: {report_path(args.output)}")
    return 0


def _cmd_eval(args) -> int:
    from onnxpress.evaluation import evaluate

    result = evaluate(args.model, args.reference, tokenizer_dir=args.tokenizer, text_files=args.text, probe=args.probe)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key.ljust(width)}  {value:.6g}" if isinstance(value, float) else f"{key.ljust(width)}  {value}")
    return 0


def _cmd_generate(args) -> int:
    from onnxpress.generation import Sampling, generate

    given = [f"--{name.replace('_', '-')}" for name in SAMPLING_OPTIONS if getattr(args, name) is not None]
    if given and not args.sample:
        raise OnnxpressError(f"{', '.join(given)} only shape sampled tokens: add --sample")
    sampling = None
    if args.sample:
        sampling = Sampling(**{name: getattr(args, name) for name in SAMPLING_OPTIONS if getattr(args, name) is not None})
    text, result = generate(args.model, args.prompt, tokenizer=args.tokenizer, max_new_tokens=args.max_new_tokens,
                            sampling=sampling, threads=args.threads)
    rate = result.decode_tokens_per_s
    print(text)
    print(f"prompt tokens {result.prompt_tokens}, new tokens {len(result.tokens)}, "
          f"prefill {1e3 * result.prefill_seconds:.1f} ms, "
          f"decode {f'{rate:.1f} tokens/s' if rate is not None else '- (one new token)'}")
    return 0


COMMANDS = {"export": _cmd_export, "inspect": _cmd_inspect, "compile": _cmd_compile, "eval": _cmd_eval,
            "generate": _cmd_generate}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except OnnxpressError as exc:
        print(f"onnxpress: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnxpress: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
