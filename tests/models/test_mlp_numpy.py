"""Local training in numpy and the deterministic shards of the digits training split."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from services.models import digits, mlp_numpy
from services.models.onnx_mlp import mlp_graph, read_mlp_weights
from services.models.shards import shard_indices


@pytest.fixture(scope="module")
def split():
    return digits.load_split()


def test_local_sgd_lowers_the_loss_on_a_shard(split):
    x_train, _, y_train, _ = split
    rows = shard_indices(y_train, 0, 2)
    layers = mlp_numpy.init_layers((64, 32, 10), seed=0)
    result = mlp_numpy.train_local(layers, x_train[rows], y_train[rows], epochs=10, lr=0.1, batch_size=32)
    assert result.loss < 0.25 * result.loss_before
    assert result.accuracy > 0.85
    assert [w.shape for w, _ in result.layers] == [(64, 32), (32, 10)]
    assert all(w.dtype == np.float32 for w, _ in result.layers)


def test_training_is_reproducible_for_a_seed_and_leaves_its_input_alone(split):
    x, _, y, _ = split
    layers = mlp_numpy.init_layers((64, 16, 10), seed=1)
    before = layers[0][0].copy()
    a = mlp_numpy.train_local(layers, x[:200], y[:200], epochs=1, lr=0.05, batch_size=16, seed=3)
    b = mlp_numpy.train_local(layers, x[:200], y[:200], epochs=1, lr=0.05, batch_size=16, seed=3)
    np.testing.assert_array_equal(a.layers[0][0], b.layers[0][0])
    np.testing.assert_array_equal(layers[0][0], before)


class Stop(Exception):
    pass


@pytest.mark.parametrize("stop_at", [1, 20], ids=["first-batch", "second-epoch"])
def test_what_check_stop_raises_before_a_mini_batch_ends_the_training(split, stop_at):
    x, _, y, _ = split
    calls = []

    def check_stop() -> None:
        calls.append(1)
        if len(calls) == stop_at:
            raise Stop()
    with pytest.raises(Stop):  # 200 rows in batches of 16: 13 mini-batches an epoch
        mlp_numpy.train_local(mlp_numpy.init_layers((64, 16, 10)), x[:200], y[:200], epochs=10**9, lr=0.05,
                              batch_size=16, check_stop=check_stop)
    assert len(calls) == stop_at


def test_the_fedprox_term_keeps_weights_closer_to_the_global_ones(split):
    x, _, y, _ = split
    layers = mlp_numpy.init_layers((64, 16, 10), seed=2)
    plain = mlp_numpy.train_local(layers, x[:300], y[:300], epochs=2, lr=0.1, batch_size=16)
    prox = mlp_numpy.train_local(layers, x[:300], y[:300], epochs=2, lr=0.1, batch_size=16, mu=1.0)

    def distance(result):
        return sum(float(np.sum((w - w0) ** 2)) for (w, _), (w0, _) in zip(result.layers, layers))

    assert distance(prox) < distance(plain)


def test_the_numpy_forward_pass_matches_onnx_runtime(split, tmp_path):
    _, x_test, _, y_test = split
    layers = mlp_numpy.init_layers((64, 8, 10), seed=4)
    path = tmp_path / "m.onnx"
    model = mlp_graph([w for w, _ in layers], [b for _, b in layers], name="m", input_scale=1 / 16)
    onnx.save(model, path)
    assert digits.accuracy(path, x_test, y_test) == pytest.approx(mlp_numpy.accuracy(layers, x_test, y_test))
    read = read_mlp_weights(onnx.load(path))
    np.testing.assert_array_equal(read[1][0], layers[1][0])


@pytest.mark.parametrize("mode", ["iid", "label_skew"])
def test_shards_are_deterministic_disjoint_and_cover_the_data(split, mode):
    y = split[2]
    shards = [shard_indices(y, i, 3, mode) for i in range(3)]
    assert all(np.array_equal(s, shard_indices(y, i, 3, mode)) for i, s in enumerate(shards))
    joined = np.concatenate(shards)
    assert len(joined) == len(y) == len(np.unique(joined))


def test_label_skew_gives_each_node_few_labels_and_iid_all_of_them(split):
    y = split[2]
    assert all(len(np.unique(y[shard_indices(y, i, 5, "iid")])) == 10 for i in range(5))
    skewed = [set(np.unique(y[shard_indices(y, i, 5, "label_skew")])) for i in range(5)]
    assert all(len(labels) <= 5 for labels in skewed)
    assert set().union(*skewed) == set(range(10))


@pytest.mark.parametrize("index, count, mode", [(2, 2, "iid"), (0, 0, "iid"), (0, 2, "dirichlet")])
def test_impossible_shards_are_refused(index, count, mode):
    with pytest.raises(ValueError):
        shard_indices(np.arange(10), index, count, mode)
