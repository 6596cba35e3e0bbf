"""Every benchmark in turn: python -m minillm.bench [--write]

Training (step time, MFU, memory, PyTorch side by side), the two readings of the
layers (reference against fast), sampling (with and without the KV cache), the
tokenizer, and preparing a large corpus; --write records each table in BENCHMARKS.md.
"""

import sys

from minillm.bench import data, readings, sampling, tokenizer, training


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--write"]):
        sys.exit("usage: python -m minillm.bench [--write]  (each python -m minillm.bench.NAME takes more options)")
    for bench in (training, readings, sampling, tokenizer, data):
        bench.main(argv)


if __name__ == "__main__":
    main()
