"""Corpora: real PTB/WikiText-2 statistics, verification errors, batchify and resumable windows."""

import numpy as np
import pytest

from jaxsparse import corpora
from trainkit.data_root import MissingDataError


@pytest.mark.parametrize("name,train_tokens,vocab,valid_tokens,test_tokens", [
    ("ptb", 929_589, 10_000, 73_760, 82_430),
    ("wikitext-2", 2_088_628, 33_278, 217_646, 245_569),
])
def test_real_corpus_statistics(data_root, name, train_tokens, vocab, valid_tokens, test_tokens):
  corpus = corpora.load_corpus(name, data_root)
  assert (len(corpus.train), corpus.vocab_size) == (train_tokens, vocab)
  assert (len(corpus.valid), len(corpus.test)) == (valid_tokens, test_tokens)
  assert corpus.train.max() == vocab - 1 and corpus.train.min() == 0
  eos = corpus.vocab.index(corpora.EOS)
  assert corpus.train[-1] == eos


def _copy_corpus(data_root, tmp_path):
  target = tmp_path / "ptb"
  target.mkdir()
  for name in corpora.CORPORA["ptb"].files.values():
    (target / name).write_bytes((data_root / "ptb" / name).read_bytes())
  return target


def test_missing_file_says_how_to_get_it(tmp_path):
  with pytest.raises(MissingDataError, match=r"ptb\.train\.txt.*corpora download --corpus=ptb"):
    corpora.load_corpus("ptb", tmp_path)


def test_altered_file_is_rejected(data_root, tmp_path):
  target = _copy_corpus(data_root, tmp_path)
  with open(target / "ptb.valid.txt", "a") as f:
    f.write(" extra\n")
  with pytest.raises(MissingDataError, match="altered or corrupt"):
    corpora.load_corpus("ptb", tmp_path)


def test_unknown_corpus_lists_valid_names():
  with pytest.raises(ValueError, match=r"Unknown corpus 'ptb2'.*wikitext-2"):
    corpora.load_corpus("ptb2")


def test_tokenize_ends_every_line_with_eos():
  assert corpora.tokenize(" a b \n\n c\n") == ["a", "b", "<eos>", "<eos>", "c", "<eos>"]


def test_batchify_makes_contiguous_streams():
  stream = corpora.batchify(np.arange(23), 4)
  np.testing.assert_array_equal(stream, np.arange(20).reshape(4, 5))


def test_windows_cover_the_stream_and_resume_exactly():
  stream = corpora.batchify(np.arange(4000), 4)
  windows = corpora.TrainWindows(stream, bptt=20, seed=3)
  covered = []
  for _ in range(12):
    inputs, targets, length, _ = windows.next()
    assert inputs.shape == targets.shape == (4, length) and length >= 5
    np.testing.assert_array_equal(targets, inputs + 1)
    covered.append(inputs[0])
  np.testing.assert_array_equal(np.concatenate(covered), np.arange(len(np.concatenate(covered))))
  saved = windows.position()
  import json
  saved = json.loads(json.dumps(saved))
  expected = [windows.next()[0] for _ in range(60)]
  resumed = corpora.TrainWindows(stream, bptt=20, seed=3)
  resumed.restore(saved)
  for want in expected:
    np.testing.assert_array_equal(resumed.next()[0], want)
  assert resumed.epoch >= 1


def test_awd_lengths_follow_the_recipe():
  rng = np.random.default_rng(0)
  lengths = np.array([corpora.awd_window_length(rng, 70) for _ in range(4000)])
  assert lengths.min() >= 5
  long = lengths[lengths > 52]
  assert 0.92 < len(long) / len(lengths) < 0.98
  assert abs(long.mean() - 69.5) < 0.5 and abs(long.std() - 5) < 0.5
  quantised = [corpora.awd_window_length(rng, 70, quantum=5) for _ in range(200)]
  assert all(q % 5 == 0 for q in quantised)
