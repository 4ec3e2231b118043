"""Critics: the torch-free state-dict reader, the imported published critics against a NumPy forward
pass of the raw tensors, the losses against NumPy restatements, augmentation, and trainable steps."""

from __future__ import annotations

import io
import pickle
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

from jaxldm import critics, torch_import


# ---------------------------------------------------------------------------------------------------
# Hand-written zip-pickle files (no torch needed): tensors with offsets, strides and shared storages.


def _global(module: str, name: str) -> bytes:
  return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _unicode(text: str) -> bytes:
  data = text.encode()
  return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
  return pickle.BININT + struct.pack("<i", value)


def _int_tuple(values) -> bytes:
  return pickle.MARK + b"".join(_int(v) for v in values) + pickle.TUPLE


def _write_torch_file(path, storages: dict[str, tuple[str, np.ndarray]], tensors: dict) -> None:
  """tensors: name -> (storage key, offset, size, stride); storages: key -> (storage type, flat data)."""
  body = [pickle.PROTO + b"\x02", _global("collections", "OrderedDict"), pickle.EMPTY_TUPLE, pickle.REDUCE,
          pickle.MARK]
  for name, (key, offset, size, stride) in tensors.items():
    storage_type, data = storages[key]
    body += [_unicode(name), _global("torch._utils", "_rebuild_tensor_v2"), pickle.MARK,
             pickle.MARK, _unicode("storage"), _global("torch", storage_type), _unicode(key), _unicode("cpu"),
             _int(data.size), pickle.TUPLE, pickle.BINPERSID,
             _int(offset), _int_tuple(size), _int_tuple(stride), pickle.NEWFALSE,
             _global("collections", "OrderedDict"), pickle.EMPTY_TUPLE, pickle.REDUCE,
             pickle.TUPLE, pickle.REDUCE]
  body += [pickle.SETITEMS, pickle.STOP]
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("model/data.pkl", b"".join(body))
    archive.writestr("model/version", "3\n")
    for key, (_, data) in storages.items():
      archive.writestr(f"model/data/{key}", data.astype(data.dtype.newbyteorder("<")).tobytes())


def test_reader_follows_offsets_strides_and_storage_types(tmp_path):
  flat = np.arange(24, dtype=np.float32)
  longs = np.array([7, -3, 2**40], dtype=np.int64)
  path = tmp_path / "handmade.pt"
  _write_torch_file(path, {"0": ("FloatStorage", flat), "1": ("LongStorage", longs)}, {
      "matrix": ("0", 0, (4, 6), (6, 1)),
      "transposed": ("0", 0, (6, 4), (1, 6)),
      "offset_rows": ("0", 5, (2, 3), (6, 2)),
      "scalar": ("1", 2, (), ()),
      "longs": ("1", 0, (3,), (1,)),
  })
  loaded = torch_import.load_state_dict(path)
  assert list(loaded) == ["matrix", "transposed", "offset_rows", "scalar", "longs"]
  np.testing.assert_array_equal(loaded["matrix"], flat.reshape(4, 6))
  np.testing.assert_array_equal(loaded["transposed"], flat.reshape(4, 6).T)
  np.testing.assert_array_equal(loaded["offset_rows"], [[5, 7, 9], [11, 13, 15]])
  assert loaded["scalar"] == 2**40 and loaded["longs"].dtype == np.int64
  np.testing.assert_array_equal(loaded["longs"], longs)


def test_reader_refuses_foreign_globals(tmp_path):
  path = tmp_path / "evil.pt"
  payload = pickle.PROTO + b"\x02" + _global("os", "system") + _unicode("true") + pickle.TUPLE1 + pickle.REDUCE
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", payload + pickle.STOP)
  with pytest.raises(pickle.UnpicklingError, match="refusing global os.system"):
    torch_import.load_state_dict(path)


def test_published_files_have_the_reference_layout(data_root):
  simclr = torch_import.load_state_dict(data_root / "critics/omniglot_simclr_z256.pt")
  protonet = torch_import.load_state_dict(data_root / "critics/omniglot_protonet_z256.pt")
  for tensors, head in [(simclr, "projection.0"), (protonet, "metric_layer")]:
    assert tensors["embedding.0.0.weight"].shape == (64, 1, 3, 3)
    assert tensors["embedding.3.0.weight"].shape == (64, 64, 3, 3)
    assert tensors["embedding.6.weight"].shape == (256, 576)
    assert tensors[f"{head}.weight"].shape == (128, 256)
    assert tensors["embedding.1.1.num_batches_tracked"].dtype == np.int64
    assert np.all(tensors["embedding.2.1.running_var"] > 0)


def test_wrong_kind_and_bad_state_dict_are_named(data_root):
  with pytest.raises(ValueError, match="unknown critic kind 'vae'"):
    critics.load_published_critic("vae", data_root)
  tensors = torch_import.load_state_dict(data_root / "critics/omniglot_simclr_z256.pt")
  with pytest.raises(ValueError, match="missing \\['metric_layer.bias'"):
    critics.critic_from_state_dict("protonet", tensors)


# ---------------------------------------------------------------------------------------------------
# Imported critics against a NumPy forward pass of the same tensors.


def _numpy_forward(tensors: dict[str, np.ndarray], head: str, images_nchw: np.ndarray):
  x = images_nchw.astype(np.float64)
  for block in range(4):
    weight, bias = tensors[f"embedding.{block}.0.weight"], tensors[f"embedding.{block}.0.bias"]
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    height, width = x.shape[2:]
    out = np.zeros((x.shape[0], weight.shape[0], height, width)) + bias[None, :, None, None]
    for dy in range(3):
      for dx in range(3):
        out += np.einsum("nchw,oc->nohw", padded[:, :, dy:dy + height, dx:dx + width], weight[:, :, dy, dx])
    norm = f"embedding.{block}.1"
    out = ((out - tensors[f"{norm}.running_mean"][None, :, None, None])
           / np.sqrt(tensors[f"{norm}.running_var"][None, :, None, None] + 1e-5)
           * tensors[f"{norm}.weight"][None, :, None, None] + tensors[f"{norm}.bias"][None, :, None, None])
    out = np.maximum(out, 0)
    h2, w2 = height // 2, width // 2
    x = out[:, :, :2 * h2, :2 * w2].reshape(out.shape[0], out.shape[1], h2, 2, w2, 2).max(axis=(3, 5))
  flat = np.maximum(x.reshape(x.shape[0], -1), 0)
  features = flat @ tensors["embedding.6.weight"].T + tensors["embedding.6.bias"]
  return features, features @ tensors[f"{head}.weight"].T + tensors[f"{head}.bias"]


def _omniglot_drawings(data_root, count: int) -> np.ndarray:
  """A few held-out Omniglot drawings as the critics saw them: 50x50, ink = 1, binary; [count, 50, 50]."""
  images = []
  with zipfile.ZipFile(data_root / "omniglot/images_evaluation.zip") as archive:
    names = sorted(n for n in archive.namelist() if "/character02/" in n and n.endswith(".png"))
    for name in names[::len(names) // count][:count]:
      grey = Image.open(io.BytesIO(archive.read(name))).convert("L").resize((50, 50), Image.BILINEAR)
      ink = 1.0 - np.asarray(grey, np.float32) / 255.0
      images.append((ink - ink.min()) / (ink.max() - ink.min()) > 0.5)
  return np.stack(images).astype(np.float32)


@pytest.mark.parametrize("kind,head", [("simclr", "projection.0"), ("protonet", "metric_layer")])
def test_imported_critic_matches_numpy_forward(data_root, kind, head):
  drawings = _omniglot_drawings(data_root, 4)
  tensors = torch_import.load_state_dict(data_root / critics.PUBLISHED_CRITICS[kind][0])
  model = critics.load_published_critic(kind, data_root)
  features, head_out = model(jnp.asarray(drawings[..., None]))
  expected_features, expected_head = _numpy_forward(tensors, head, drawings[:, None])
  scale = np.abs(expected_features).max()
  np.testing.assert_allclose(np.asarray(features), expected_features, atol=1e-5 * scale, rtol=0)
  np.testing.assert_allclose(np.asarray(head_out), expected_head, atol=1e-5 * np.abs(expected_head).max(), rtol=0)
  # The drawings are distinct characters: the embeddings must tell them apart.
  assert np.linalg.norm(expected_features[0] - expected_features[1]) > 0.1 * np.linalg.norm(expected_features[0])


# ---------------------------------------------------------------------------------------------------
# Losses.


def test_nt_xent_matches_numpy_restatement():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
  z = np.concatenate([a, b])
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  similarity = z @ z.T
  terms = []
  for i in range(10):
    positive = (i + 5) % 10
    denominator = sum(np.exp(similarity[i, j] / 0.5) for j in range(10) if j != i)
    terms.append(-np.log(np.exp(similarity[i, positive] / 0.5) / denominator))
  loss = critics.nt_xent_loss(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), 0.5)
  np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-5)


def test_prototypical_loss_matches_numpy_restatement():
  rng = np.random.default_rng(1)
  way, shot, per_class = 3, 2, 2
  support, queries = rng.normal(size=(way * shot, 4)), rng.normal(size=(way * per_class, 4))
  prototypes = support.reshape(way, shot, 4).mean(axis=1)
  distances = ((queries[:, None] - prototypes[None]) ** 2).sum(-1)
  labels = np.repeat(np.arange(way), per_class)
  log_p = -distances - np.log(np.exp(-distances).sum(1, keepdims=True))
  loss, accuracy = critics.prototypical_loss(jnp.asarray(support), jnp.asarray(queries), way, shot)
  np.testing.assert_allclose(float(loss), -log_p[np.arange(len(labels)), labels].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(accuracy), np.mean(distances.argmin(1) == labels))


# ---------------------------------------------------------------------------------------------------
# Augmentation and training.


def test_homography_maps_the_four_points():
  source = jnp.array([[0.0, 0.0], [50.0, 0.0], [50.0, 50.0], [0.0, 50.0]])
  target = jnp.array([[3.0, 5.0], [44.0, 2.0], [49.0, 41.0], [8.0, 47.0]])
  h = jax.jit(critics._homography_from_points)(source, target)
  mapped = (h @ jnp.concatenate([source, jnp.ones((4, 1))], axis=1).T).T
  np.testing.assert_allclose(np.asarray(mapped[:, :2] / mapped[:, 2:]), np.asarray(target), atol=1e-3)


def test_contrastive_views_are_binary_random_and_keep_the_drawing():
  images = jnp.zeros((6, 50, 50, 1)).at[:, 10:40, 23:27].set(1.0).at[:, 23:27, 10:40].set(1.0)
  view_a = critics.contrastive_augment(jax.random.key(0), images)
  view_b = critics.contrastive_augment(jax.random.key(1), images)
  np.testing.assert_array_equal(view_a, critics.contrastive_augment(jax.random.key(0), images))
  assert set(np.unique(np.asarray(view_a))) <= {0.0, 1.0}
  assert not np.array_equal(np.asarray(view_a), np.asarray(view_b))
  ink = np.asarray(view_a).sum(axis=(1, 2, 3))
  original = float(images[0].sum())
  assert np.all(ink > 0.4 * original) and np.all(ink < 2.5 * original)


@pytest.fixture(scope="module")
def tiny_batch():
  rng = np.random.default_rng(0)
  images = np.zeros((8, 50, 50, 1), np.float32)
  for i in range(8):
    row, col = rng.integers(5, 35, size=2)
    images[i, row:row + 12, col:col + 3] = 1.0
    images[i, row + i % 4:row + i % 4 + 3, col:col + 10] = 1.0
  return jnp.asarray(images)


def test_simclr_step_lowers_the_loss_on_fixed_views(tiny_batch):
  model = critics.SimCLRCritic(32, rngs=nnx.Rngs(0))
  tx = optax.adam(1e-3)
  graphdef, state = critics.init_train_state(model, tx)
  step = critics.make_simclr_train_step(graphdef, tx)
  key = jax.random.key(3)
  losses = []
  for _ in range(6):
    state, metrics = step(state, tiny_batch, key)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.05, losses
  assert int(state.step) == 6
  trained = critics.to_model(graphdef, state)
  assert not np.allclose(np.asarray(trained.embedding.blocks[0].norm.mean[...]), 0.0)


def test_protonet_step_learns_an_episode(tiny_batch):
  model = critics.ProtoNetCritic(32, rngs=nnx.Rngs(1))
  tx = optax.adam(1e-3)
  graphdef, state = critics.init_train_state(model, tx)
  way = 4
  step = critics.make_protonet_train_step(graphdef, tx, way=way, shot=1)
  support, queries = tiny_batch[:way], tiny_batch[way:]
  losses = []
  for _ in range(6):
    state, metrics = step(state, support, queries)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.05, losses
  with pytest.raises(ValueError, match="way\\*shot"):
    step(state, tiny_batch[:3], queries)
