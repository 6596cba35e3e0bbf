"""The checkpoint loader on damaged files: a valid checkpoint, edited at random (cut short, bytes
overwritten, inserted or deleted, several edits at once), either fails to load with
CheckpointError, whose message is one line (the scripts print it as their one-line error), or
loads exactly what was saved: every parameter and optimizer moment byte-identical. Loading
different numbers, or failing with any other exception, is a bug.
"""

import io
import zipfile

import numpy
import pytest
from hypothesis import given, settings, strategies as st

from minillm import checkpoint
from minillm.model import GPT, GPTConfig
from minillm.optim import AdamW
from minillm.tokenizers.char import CharTokenizer

CHARS = "abcdef"
STEP = 7


def host_bytes(arrays):
    """{name: (dtype, shape, raw bytes)}: what "byte-identical" compares."""
    return {name: (a.dtype.str, a.shape, numpy.asarray(a).tobytes()) for name, a in arrays.items()}


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """(the bytes of a saved checkpoint, its parameters, its optimizer moments, a folder to write copies in)."""
    model = GPT(GPTConfig(vocab_size=len(CHARS), block_size=4, n_layer=1, n_head=2, n_embd=4), seed=0)
    optimizer = AdamW(model.params)
    rng = numpy.random.default_rng(0)
    optimizer.step({name: rng.normal(size=p.shape).astype(p.dtype) for name, p in model.params.items()})
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "ckpt.npz"
    checkpoint.save(path, model, CharTokenizer(CHARS), optimizer, step=STEP)
    state = optimizer.state_dict()
    return path.read_bytes(), host_bytes(model.params), host_bytes(state["m"]), host_bytes(state["v"]), folder


# A position counts from the start, or, when negative, from the end: the last few KB of a
# zip are its central directory (names, offsets, sizes, checksums, flags), where one changed
# byte changes how the whole file is read, so about half the edits land there.
positions = st.integers(min_value=-4096, max_value=1 << 16)
edits = st.one_of(
    st.tuples(st.just("truncate"), positions),
    st.tuples(st.just("overwrite"), positions, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), positions, st.integers(min_value=1, max_value=64)),
)


def apply_edit(data, edit):
    kind, position, *rest = edit
    at = position % (len(data) + 1)
    if kind == "truncate":
        return data[:at]
    if kind == "delete":
        return data[:at] + data[at + rest[0] :]
    if kind == "insert":
        return data[:at] + rest[0] + data[at:]
    payload = rest[0]
    return (data[:at] + payload + data[at + len(payload) :])[: max(len(data), at)]


@settings(max_examples=2000, deadline=None)
@given(recipe=st.lists(edits, min_size=1, max_size=3))
def test_a_damaged_checkpoint_raises_checkpoint_error_or_loads_the_same_numbers(original, recipe):
    good, params, moments_m, moments_v, folder = original
    damaged = good
    for edit in recipe:
        damaged = apply_edit(damaged, edit)
    path = folder / "damaged.npz"
    path.write_bytes(damaged)
    try:
        model, tokenizer, meta, optimizer_state = checkpoint.load(path)
    except checkpoint.CheckpointError as err:
        assert len(str(err).splitlines()) == 1, str(err)
        return
    assert host_bytes(model.params) == params
    assert optimizer_state is not None and optimizer_state["t"] == 1
    assert host_bytes(optimizer_state["m"]) == moments_m
    assert host_bytes(optimizer_state["v"]) == moments_v
    assert "".join(tokenizer.chars) == CHARS and meta["step"] == STEP


@pytest.mark.parametrize("field_offset, value", [(10, b"\x63\x00"), (8, b"\x41\x00"), (6, b"\xff\x00")])
def test_a_central_directory_asking_for_an_unknown_method_is_a_checkpoint_error(original, field_offset, value):
    """One overwritten field of the zip's first directory entry: compression method 99, the
    encryption flags, a future zip version. zipfile raises NotImplementedError or RuntimeError
    for these, not BadZipFile (random edits hit them about once in a hundred)."""
    good, *_, folder = original
    at = good.index(b"PK\x01\x02") + field_offset
    path = folder / f"field-{field_offset}.npz"
    path.write_bytes(good[:at] + value + good[at + len(value) :])
    with pytest.raises(checkpoint.CheckpointError, match="not a readable minillm checkpoint"):
        checkpoint.load(path)


@pytest.mark.parametrize("member, stored_as", [("params/wpe.weight", numpy.int32), ("adam_m/wte.weight", numpy.uint32)])
def test_a_member_whose_header_gives_another_dtype_is_refused_in_one_line(original, member, stored_as):
    """A well-formed archive whose member's .npy header says int32 (or another dtype than the checkpoint's)
    is refused, in one line naming the member, rather than its bytes loaded as other numbers."""
    good, *_, folder = original
    source = zipfile.ZipFile(io.BytesIO(good))
    assert member + ".npy" in source.namelist()
    path = folder / f"{member.replace('/', '-')}-{numpy.dtype(stored_as)}.npz"
    with zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename == member + ".npy":
                npy = io.BytesIO()
                numpy.lib.format.write_array(npy, numpy.load(io.BytesIO(data)).view(stored_as))
                data = npy.getvalue()
            target.writestr(info.filename, data)
    with pytest.raises(checkpoint.CheckpointError) as refused:
        checkpoint.load(path)
    assert len(str(refused.value).splitlines()) == 1
    assert f"{member} is stored as {numpy.dtype(stored_as)}" in str(refused.value)
