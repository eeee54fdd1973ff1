"""``fastbert`` command line (also ``python -m fastbert``): ``info``, ``bench``, ``pretrain``, ``finetune``."""

import argparse
import json
import sys

from fastbert._optional import MissingExtra
from fastbert.info import collect, print_info


def bench(argv):
    """``fastbert bench ...``: the benchmark suite, :mod:`fastbert.bench.run` (the same flags;
    ``fastbert bench --help`` lists them). Results go to ``--out``, default
    ``./fastbert-bench-results``. A missing optional dependency (``pip install 'fastbert[bench]'``)
    is one line on stderr and exit status 2."""
    try:
        from fastbert.bench import run

        return run.main(argv)
    except MissingExtra as e:
        print(e, file=sys.stderr)
        return 2


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # every other flag belongs to the suite: fastbert bench --help lists them
        return bench(argv[1:])
    parser = argparse.ArgumentParser(prog="fastbert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, what _C was built with, backends and why not")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub.add_parser(
        "bench",
        help="run the benchmark suite (fastbert bench --help: --quick/--full, --ops, "
        "--dtype, --device, --out, --compare, ...)",
    )
    from fastbert.train import commands, finetune_command

    commands.add_pretrain_arguments(
        sub.add_parser(
            "pretrain",
            help="pretrain BERT (MLM + NSP); no arguments: BERT-tiny on the bundled Austen novels",
            description=commands.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    finetune_command.add_finetune_arguments(
        sub.add_parser(
            "finetune",
            help="fine-tune a pretrained checkpoint (word order, or which novel) and compare with scratch",
            description=commands.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    args = parser.parse_args(argv)
    if args.command in ("pretrain", "finetune"):
        return commands.main(args.command, args)
    if args.command == "info":
        info = collect()
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print_info(info)
    return 0
