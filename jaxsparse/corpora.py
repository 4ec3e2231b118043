"""Word-level corpora (Penn Treebank, WikiText-2): verified files, vocabulary, batchified streams, BPTT windows."""

from __future__ import annotations

import dataclasses
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from trainkit import data_root as data_root_lib

EOS = "<eos>"


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
  folder: str
  files: dict[str, str]  # split -> file name
  sha256: dict[str, str]  # file name -> sha256
  archive_url: str
  archive_member_prefix: str  # where the files lie inside the archive

  def how_to_get(self, root: Path) -> str:
    return (f"Get it with `python -m jaxsparse.corpora download --corpus={self.folder} --data_root={root}` "
            f"(from {self.archive_url}), or copy the files {sorted(self.files.values())} into {root / self.folder}.")


CORPORA = {
    "ptb": CorpusSpec(
        folder="ptb",
        files={"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"},
        sha256={
            "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
            "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
            "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
        },
        archive_url="http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",
        archive_member_prefix="simple-examples/data/",
    ),
    "wikitext-2": CorpusSpec(
        folder="wikitext-2",
        files={"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"},
        sha256={
            "wiki.train.tokens": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
            "wiki.valid.tokens": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
            "wiki.test.tokens": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        },
        archive_url="https://wikitext.smerity.com/wikitext-2-v1.zip",
        archive_member_prefix="wikitext-2/",
    ),
}


def _spec(corpus: str) -> CorpusSpec:
  if corpus not in CORPORA:
    raise ValueError(f"Unknown corpus {corpus!r}; valid: {sorted(CORPORA)}.")
  return CORPORA[corpus]


def tokenize(text: str) -> list[str]:
  """Splits on whitespace and ends every line (empty ones too, as AWD-LSTM does) with `<eos>`."""
  words: list[str] = []
  for line in text.splitlines():
    words.extend(line.split())
    words.append(EOS)
  return words


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Token ids of each split and the vocabulary (built from the training split, in order of first use)."""
  vocab: tuple[str, ...]
  train: np.ndarray
  valid: np.ndarray
  test: np.ndarray

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)


def load_corpus(corpus: str, root: str | Path | None = None, verify: bool = True) -> Corpus:
  """Reads and verifies a corpus from `<data root>/<corpus>/`; raises MissingDataError saying how to get it."""
  spec = _spec(corpus)
  root = data_root_lib.resolve(root)
  texts = {}
  for split, name in spec.files.items():
    path = data_root_lib.require_file(root / spec.folder / name, spec.how_to_get(root),
                                      spec.sha256[name] if verify else None)
    texts[split] = path.read_text(encoding="utf-8")
  train_words = tokenize(texts["train"])
  index: dict[str, int] = {}
  for word in train_words:
    index.setdefault(word, len(index))

  def encode(words: list[str], split: str) -> np.ndarray:
    unknown = index.get("<unk>")
    ids = np.fromiter((index.get(w, -1) for w in words), dtype=np.int32, count=len(words))
    if unknown is not None:
      ids[ids < 0] = unknown
    elif (ids < 0).any():
      raise ValueError(f"{corpus} {split} has words outside the training vocabulary and no <unk> token.")
    return ids

  return Corpus(vocab=tuple(index), train=encode(train_words, "train"),
                valid=encode(tokenize(texts["valid"]), "valid"), test=encode(tokenize(texts["test"]), "test"))


def download(corpus: str, root: str | Path | None = None) -> Path:
  """Fetches the canonical archive, extracts the three split files and verifies their sha256."""
  spec = _spec(corpus)
  root = data_root_lib.resolve(root)
  target = root / spec.folder
  target.mkdir(parents=True, exist_ok=True)
  archive = data_root_lib.download(spec.archive_url, root / "downloads" / Path(spec.archive_url).name, None)
  wanted = {spec.archive_member_prefix + name: name for name in spec.files.values()}
  if archive.suffix == ".zip":
    with zipfile.ZipFile(archive) as zf:
      members = {m: zf.read(m) for m in zf.namelist() if m.removeprefix("./") in wanted}
      members = {m.removeprefix("./"): data for m, data in members.items()}
  else:
    with tarfile.open(archive) as tf:
      members = {m.name.removeprefix("./"): tf.extractfile(m).read()
                 for m in tf.getmembers() if m.name.removeprefix("./") in wanted}
  for member, name in wanted.items():
    if member not in members:
      raise data_root_lib.MissingDataError(f"{archive} has no member {member}; the archive is not the expected one.")
    (target / name).write_bytes(members[member])
    data_root_lib.require_file(target / name, spec.how_to_get(root), spec.sha256[name])
  return target


def batchify(ids: np.ndarray, batch_size: int) -> np.ndarray:
  """Cuts the token stream into `batch_size` contiguous streams: [batch_size, tokens // batch_size]."""
  n = len(ids) // batch_size
  if n < 2:
    raise ValueError(f"{len(ids)} tokens are too few for batch size {batch_size}.")
  return np.ascontiguousarray(ids[: n * batch_size].reshape(batch_size, n))


def awd_window_length(rng: np.random.Generator, bptt: int, quantum: int = 1) -> int:
  """AWD-LSTM's random BPTT length: bptt w.p. 0.95 else bptt/2, then N(len, 5), at least 5.

  `quantum` > 1 rounds the length to a multiple of it, bounding how many shapes the jitted step compiles.
  """
  base = bptt if rng.random() < 0.95 else bptt / 2
  length = max(5, int(rng.normal(base, 5)))
  if quantum > 1:
    length = max(quantum, int(round(length / quantum)) * quantum)
  return length


class TrainWindows:
  """Iterates AWD random-length windows over a batchified stream, resumable from a JSON position."""

  def __init__(self, stream: np.ndarray, bptt: int, seed: int, random_length: bool = True, quantum: int = 1):
    self.stream, self.bptt, self.seed = stream, bptt, seed
    self.random_length, self.quantum = random_length, quantum
    self.epoch, self.offset = 0, 0
    self._rng = np.random.default_rng([seed, 0])

  def position(self) -> dict:
    return {"epoch": self.epoch, "offset": self.offset, "rng": self._rng.bit_generator.state}

  def restore(self, position: dict) -> None:
    self.epoch, self.offset = int(position["epoch"]), int(position["offset"])
    self._rng.bit_generator.state = position["rng"]

  @property
  def epoch_progress(self) -> float:
    """Epochs done, fractional: drives the learning-rate schedule."""
    return self.epoch + self.offset / (self.stream.shape[1] - 1)

  def windows_per_epoch(self) -> int:
    return max(1, (self.stream.shape[1] - 1) // self.bptt)

  def next(self) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """Returns (inputs [B, L], targets [B, L], L, starts_new_epoch)."""
    remaining = self.stream.shape[1] - 1 - self.offset
    if remaining < 1:
      self.epoch, self.offset = self.epoch + 1, 0
      self._rng = np.random.default_rng([self.seed, self.epoch])
      remaining = self.stream.shape[1] - 1
    new_epoch = self.offset == 0
    length = awd_window_length(self._rng, self.bptt, self.quantum) if self.random_length else self.bptt
    length = min(length, remaining)
    i = self.offset
    self.offset += length
    return self.stream[:, i:i + length], self.stream[:, i + 1:i + 1 + length], length, new_epoch


def eval_windows(stream: np.ndarray, bptt: int):
  """Fixed-length windows over a batchified stream (the last one shorter), for evaluation."""
  n = stream.shape[1] - 1
  for i in range(0, n, bptt):
    length = min(bptt, n - i)
    yield stream[:, i:i + length], stream[:, i + 1:i + 1 + length]


def main(argv: list[str] | None = None) -> None:
  import argparse
  parser = argparse.ArgumentParser(description="Download and verify a word-level corpus.")
  parser.add_argument("command", choices=["download", "verify"])
  parser.add_argument("--corpus", choices=sorted(CORPORA), required=True)
  parser.add_argument("--data_root", default=None)
  args = parser.parse_args(argv)
  if args.command == "download":
    print(f"{args.corpus} ready in {download(args.corpus, args.data_root)}")
  corpus = load_corpus(args.corpus, args.data_root)
  print(f"{args.corpus}: vocabulary {corpus.vocab_size}, tokens train {len(corpus.train)} "
        f"valid {len(corpus.valid)} test {len(corpus.test)} (sha256 verified)")


if __name__ == "__main__":
  main()
