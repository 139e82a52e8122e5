"""``python -m onnxpress.runtime_ops build``: build the ops library and print its path."""

import argparse
import sys

from onnxpress.errors import OnnxpressError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onnxpress.runtime_ops", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="build (or reuse) the library and print its path")
    build_cmd.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    build_cmd.add_argument("--ort-include-dir", help="folder with onnxruntime_cxx_api.h (default: download)")
    cuda = build_cmd.add_mutually_exclusive_group()
    cuda.add_argument("--cuda", dest="cuda", action="store_true", default=None, help="also build CUDA kernels")
    cuda.add_argument("--no-cuda", dest="cuda", action="store_false", help="CPU kernels only")
    commands.add_parser("path", help="print the path of the built library (no build)")
    args = parser.parse_args(argv)

    from . import build, library_path

    try:
        if args.command == "build":
            path = build(force=args.force, ort_include_dir=args.ort_include_dir, cuda=args.cuda)
        else:
            path = library_path(build_if_missing=False)
    except OnnxpressError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
