"""--init-from takes a minillm out dir (its best checkpoint, ckpt.npz), as well as a checkpoint file or a GPT-2
directory; a folder that is neither is one line naming both."""

import pytest

from minillm import checkpoint, hf
from minillm.training import TrainConfig, train


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory, corpus):
    folder = tmp_path_factory.mktemp("run") / "out"
    train(TrainConfig(data=str(corpus), n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_iters=10,
                      eval_interval=10, eval_iters=1, sample_tokens=0, device="cpu", threads=1, out_dir=str(folder)))
    return folder


def test_an_out_dir_gives_its_best_checkpoint(out_dir):
    model, tokenizer = checkpoint.load_pretrained(out_dir)
    expected, _ = checkpoint.load_pretrained(out_dir / "ckpt.npz")
    assert model.params.keys() == expected.params.keys()
    assert all((model.params[name] == expected.params[name]).all() for name in model.params)
    assert tokenizer.vocab_size == model.config.vocab_size


def test_a_folder_that_is_neither_names_both(tmp_path):
    with pytest.raises(hf.PretrainedError, match="neither a GPT-2 directory .* nor a minillm out dir"):
        checkpoint.load_pretrained(tmp_path)
