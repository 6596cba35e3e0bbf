"""python -m minillm.bench.data on a corpus of a fraction of a MB: every row is measured and printed, and the
Hugging Face rows (where tokenizers is installed) encoded the same text into the same number of tokens."""

from minillm.bench import data as bench_data


def test_every_row_is_measured_on_a_small_corpus(capsys):
    bench_data.main(["--sizes", "0.3"])
    table = capsys.readouterr().out.split("| corpus ")[-1]
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:] if line.startswith("|")]
    names = [row[1].strip() for row in rows]
    expected = ["char", "bpe 4,096", "bpe, vocabulary given"]
    assert names[:3] == expected and set(names[3:]) <= {"HF 1 thread", "HF all threads"}
    tokens = {name: int(row[4].replace(",", "")) for name, row in zip(names, rows)}
    assert tokens["char"] >= 300_000 and tokens["bpe 4,096"] == tokens["bpe, vocabulary given"]
    for name in names[3:]:  # whole text against train and val encoded apart: the cut may add a token or two
        assert abs(tokens[name] - tokens["bpe 4,096"]) <= 2
