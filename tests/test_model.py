"""model/: both backbones learn (the toy task, masked LM), behave (padding, gather, shapes) and
save/load strictly. Tiny configs: d_model 32, 2 layers."""
import dataclasses
import json
import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import classifier_task
import data_util_hdf5 as data_util
import model
import train_util

BACKBONES = ("transformer", "textcnn")


def tiny_config(backbone: str, vocab_size: int = 50, **overrides) -> model.ModelConfig:
    values = dict(backbone=backbone, vocab_size=vocab_size, d_model=32, num_layer=2,
                  num_header=4, d_k=8, d_v=8, d_ff=64, num_filters=16, max_position=64,
                  dropout=0.0)
    values.update(overrides)
    return model.ModelConfig(**values)


def inputs_for(ids: np.ndarray) -> dict[str, np.ndarray]:
    return {"token_ids": ids, "segment_ids": np.zeros_like(ids),
            "padding_mask": (ids != 0).astype(np.int32)}


def random_ids(rows: int, length: int, vocab_size: int = 50, seed: int = 0) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(5, vocab_size, (rows, length)).astype(np.int32)
    ids[:, 0] = 2
    return ids


# ------------------------------------------------------------------------- learning
@pytest.mark.slow
@pytest.mark.parametrize("backbone", BACKBONES)
def test_toy_task_is_learnt_by_both_backbones(backbone):
    """The original's convergence check, which its Transformer failed: >= 95% held out."""
    keras.utils.set_random_seed(1)
    train_x, train_y = classifier_task.toy_task_data(3000, 16, seed=1)
    test_x, test_y = classifier_task.toy_task_data(500, 16, seed=2)
    classifier = model.build_classifier(
        model.build_backbone(tiny_config(backbone, classifier_task.TOY_VOCAB_SIZE)), 1, 0.0)
    model.compile_classifier(classifier, keras.optimizers.Adam(2e-3))
    classifier.fit(inputs_for(train_x), train_y, batch_size=32, epochs=4, verbose=0)  # 376 steps
    logits = classifier.predict(inputs_for(test_x), verbose=0)
    assert np.mean((logits[:, 0] > 0) == (test_y[:, 0] > 0.5)) >= 0.95


# without NSP the pooler gets no gradient, which Keras rightly points out
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Gradients do not exist for variables .*pooler")
@pytest.mark.parametrize("backbone", BACKBONES)
def test_masked_lm_loss_falls_below_a_tenth_of_its_start(backbone):
    keras.utils.set_random_seed(2)
    ids = random_ids(16, 12, seed=3)
    positions = np.tile(np.array([[1, 4, 7]], np.int32), (16, 1))
    targets = np.take_along_axis(ids, positions, axis=1)
    masked = ids.copy()
    np.put_along_axis(masked, positions, 4, axis=1)  # [MASK]
    x = {**inputs_for(masked), "masked_positions": positions}
    pretrainer = model.build_pretraining_model(model.build_backbone(tiny_config(backbone)))
    model.compile_pretraining_model(pretrainer, keras.optimizers.Adam(3e-3))
    history = pretrainer.fit(x, {"mlm": targets}, batch_size=16, epochs=150, verbose=0)
    losses = history.history["mlm_loss"]
    # the median of the last 10 epochs: Adam at 3e-3 on a memorised batch spikes now and then
    # (another initialisation ended on a spike of 0.98 between epochs near 0.05)
    assert np.median(losses[-10:]) < 0.1 * losses[0]


def test_masked_lm_loss_ignores_unused_slots():
    logits = tf.random.normal((2, 3, 10), seed=1)
    per_example = model.masked_lm_loss(tf.constant([[5, 6, 0], [7, 0, 0]]), logits)
    ce = keras.losses.sparse_categorical_crossentropy(tf.constant([[5, 6, 0], [7, 0, 0]]),
                                                      logits, from_logits=True).numpy()
    assert per_example.shape == (2,)
    assert float(np.mean(per_example)) == pytest.approx((ce[0, 0] + ce[0, 1] + ce[1, 0]) / 3,
                                                        rel=1e-5)
    accuracy = model.MaskedLMAccuracy()
    accuracy.update_state(tf.constant([[5, 0]]), tf.one_hot([[5, 3]], 10))
    assert float(accuracy.result()) == 1.0


# --------------------------------------------------------------------------- contract
def test_one_hot_gather_equals_tf_gather():
    sequence = tf.random.normal((3, 11, 8), seed=4)
    positions = tf.constant(np.random.default_rng(5).integers(0, 11, (3, 4)), tf.int32)
    np.testing.assert_allclose(model.one_hot_gather(sequence, positions).numpy(),
                               tf.gather(sequence, positions, batch_dims=1).numpy(), atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_shapes_and_dtypes(backbone):
    net = model.build_backbone(tiny_config(backbone))
    out = net(inputs_for(random_ids(3, 9)))
    assert out["sequence_output"].shape == (3, 9, 32)
    assert out["pooled_output"].shape == (3, 32)
    assert out["sequence_output"].dtype == "float32" and out["pooled_output"].dtype == "float32"
    pretrainer = model.build_pretraining_model(net, use_nsp=True)
    result = pretrainer({**inputs_for(random_ids(3, 9)),
                         "masked_positions": np.zeros((3, 2), np.int32)})
    assert result["mlm"].shape == (3, 2, 50) and result["nsp"].shape == (3, 2)
    assert model.build_classifier(net, 7, 0.1)(inputs_for(random_ids(3, 9))).shape == (3, 7)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_appended_padding_changes_nothing(backbone):
    net = model.build_backbone(tiny_config(backbone))
    ids = random_ids(2, 7)
    padded = np.concatenate([ids, np.zeros((2, 5), np.int32)], axis=1)
    short, long = net(inputs_for(ids)), net(inputs_for(padded))
    np.testing.assert_allclose(long["sequence_output"].numpy()[:, :7],
                               short["sequence_output"].numpy(), atol=1e-5)
    np.testing.assert_allclose(long["pooled_output"].numpy(), short["pooled_output"].numpy(),
                               atol=1e-5)


def test_fused_attention_computes_what_keras_multi_head_attention_computes():
    """The fused layer given Keras' MultiHeadAttention's weights gives its outputs, padding
    masked, so the speed-up changes no maths."""
    d_model, heads, d_k, d_v = 32, 4, 8, 6
    reference = keras.layers.MultiHeadAttention(heads, d_k, value_dim=d_v, output_shape=d_model)
    x = tf.random.normal((3, 9, d_model), seed=7)
    padding = np.ones((3, 9), np.int32)
    padding[1, 5:] = padding[2, 2:] = 0
    expected = reference(x, x, attention_mask=padding[:, None, :].astype(bool)).numpy()
    fused = model.SelfAttention(d_model, heads, d_k, d_v, dropout=0.0)
    fused.build((None, None, d_model))
    q, k, v = reference._query_dense, reference._key_dense, reference._value_dense
    kernel = np.concatenate([dense.kernel.numpy().reshape(d_model, -1) for dense in (q, k, v)], 1)
    bias = np.concatenate([dense.bias.numpy().reshape(-1) for dense in (q, k, v)])
    fused.query_key_value.set_weights([kernel, bias])
    out = reference._output_dense
    fused.output_dense.set_weights([out.kernel.numpy().reshape(heads * d_v, d_model),
                                    out.bias.numpy()])
    np.testing.assert_allclose(fused(x, padding).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_length_ordered_prediction_equals_one_padded_pass(backbone):
    classifier = model.build_classifier(model.build_backbone(tiny_config(backbone)), 3, 0.0)
    ids = random_ids(11, 20, seed=8)
    for row, length in enumerate([20, 3, 17, 1, 9, 20, 5, 2, 12, 7, 1]):
        ids[row, length:] = 0
    expected = classifier.predict(inputs_for(ids), verbose=0)
    np.testing.assert_allclose(model.predict_logits(classifier, ids, batch_size=4), expected,
                               atol=1e-5)
    assert model.trim_padding(tf.constant(ids[[1, 3, 7]])).shape == (3, 8)


def test_masked_lm_head_is_tied_to_the_token_embedding():
    net = model.build_backbone(tiny_config("textcnn"))
    pretrainer = model.build_pretraining_model(net)
    head = pretrainer.get_layer("mlm_head")
    assert head.token_embedding is model.get_token_embedding(net)
    embedding_ids = {id(v) for v in model.get_token_embedding(net).weights}
    assert embedding_ids <= {id(v) for v in pretrainer.weights}
    assert len(pretrainer.weights) == len(net.weights) + 5  # transform kernel/bias, norm x2, bias
    config = {**head.get_config(), "token_embedding": model.get_token_embedding(net)}
    assert model.MaskedLMHead.from_config(config).token_embedding is model.get_token_embedding(net)


def re_create(pretrainer: keras.Model, route: str, directory) -> keras.Model:
    if route == "config":
        return type(pretrainer).from_config(pretrainer.get_config())
    pretrainer.save(directory / "pretrainer.keras")
    return keras.saving.load_model(directory / "pretrainer.keras")


@pytest.mark.parametrize("route", ["config", "keras_file"])
@pytest.mark.parametrize("output_positions", [False, True])
def test_a_re_created_pretraining_model_scores_with_its_own_token_embedding(route,
                                                                           output_positions,
                                                                           tmp_path):
    """The head of a re-created model follows its backbone's embedding, not a copy of it."""
    pretrainer = model.build_pretraining_model(
        model.build_backbone(tiny_config("transformer"), output_positions=output_positions),
        use_nsp=True)
    again = re_create(pretrainer, route, tmp_path)
    head = again.get_layer("mlm_head")
    embedding = model.get_token_embedding(again.get_layer("backbone"))
    assert head.token_embedding is embedding
    assert len(again.weights) == len(pretrainer.weights)
    x = {**inputs_for(random_ids(2, 6)), "masked_positions": np.array([[1, 3]] * 2, np.int32)}
    again.set_weights(pretrainer.get_weights())
    for key in ("mlm", "nsp"):
        np.testing.assert_array_equal(again(x)[key].numpy(), pretrainer(x)[key].numpy())
    # scored through the head alone, so only the output side of the tie can change the logits
    sequence = np.random.default_rng(0).normal(size=(2, 6, 32)).astype(np.float32)
    before = head(sequence, x["masked_positions"]).numpy()
    embedding.embeddings.assign(np.random.default_rng(1).normal(size=(50, 32)))
    assert not np.allclose(head(sequence, x["masked_positions"]).numpy(), before)


def test_compiling_the_pretraining_model_leaves_warning_filters_alone():
    pretrainer = model.build_pretraining_model(model.build_backbone(tiny_config("transformer")))
    before = list(warnings.filters)
    model.compile_pretraining_model(pretrainer, keras.optimizers.Adam(1e-3))
    assert warnings.filters == before


@pytest.mark.parametrize("use_nsp", [False, True])
def test_compiling_the_pretraining_model_creates_its_metric_once(use_nsp, monkeypatch):
    """The masked-LM accuracy is constructed once, and that one object is what training updates."""
    created = []

    class RecordedAccuracy(model.MaskedLMAccuracy):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(model.tasks, "MaskedLMAccuracy", RecordedAccuracy)
    pretrainer = model.build_pretraining_model(model.build_backbone(tiny_config("textcnn")),
                                               use_nsp)
    model.compile_pretraining_model(pretrainer, keras.optimizers.Adam(1e-3), use_nsp)
    ids = random_ids(2, 6)
    x = {**inputs_for(ids), "masked_positions": np.array([[1, 2]] * 2, np.int32)}
    y = {"mlm": ids[:, 1:3], **({"nsp": np.array([0, 1], np.int32)} if use_nsp else {})}
    logs = pretrainer.train_on_batch(x, y, return_dict=True)
    assert len(created) == 1 and float(created[0].total) == 4.0
    assert logs["mlm_accuracy"] == float(created[0].result())


def test_no_variable_is_made_while_the_first_step_is_traced():
    """compile_* make the optimizer's slots, so Keras makes none inside the first traced step of
    a model built outside any strategy scope (the one_device case); one made there makes
    TensorFlow trace the whole step a second time."""
    made = []

    def recorded(next_creator, **kwargs):
        made.append(kwargs.get("name"))
        return next_creator(**kwargs)

    ids = random_ids(2, 6)
    pretrainer = model.build_pretraining_model(model.build_backbone(tiny_config("textcnn")))
    model.compile_pretraining_model(pretrainer, keras.optimizers.Adam(1e-3))
    classifier = model.build_classifier(
        model.build_backbone(tiny_config("transformer"), first_position_only=True), 3, 0.1,
        bag_of_words=True)
    model.set_document_frequencies(classifier, ids)
    model.compile_classifier(classifier, train_util.make_optimizer(1e-3, 10, average_momentum=0.9))
    with tf.variable_creator_scope(recorded):
        pretrainer.train_on_batch({**inputs_for(ids), "masked_positions": np.array([[1, 2]] * 2)},
                                  {"mlm": ids[:, 1:3]})
        classifier.train_on_batch(inputs_for(ids), np.eye(3)[[0, 1]])
    assert made == []


def _sequence(length: int = 6) -> np.ndarray:
    return np.random.default_rng(11).normal(size=(2, length, 32)).astype(np.float32)


def _padding(length: int = 6) -> np.ndarray:
    mask = np.ones((2, length), np.int32)
    mask[1, 4:] = 0
    return mask


def _built_embedding() -> keras.layers.Embedding:
    embedding = keras.layers.Embedding(50, 32, name="token_embedding")
    embedding.build()
    return embedding


# each custom layer, made afresh for every run, with a fixed input to call it on
LAYER_CASES = {
    "embeddings": (lambda: model.Embeddings(50, 32, 64, 2, 0.1, 0.02, name="embeddings"),
                   lambda: (random_ids(2, 6), np.array([[0, 0, 0, 1, 1, 1]] * 2, np.int32))),
    "attention_dropout": (lambda: model.AttentionDropout(0.1, seed=3, name="attention_dropout"),
                          lambda: (_sequence(),)),
    "self_attention": (lambda: model.SelfAttention(32, 4, 8, 8, 0.1, 0.02, name="self_attention"),
                       lambda: (_sequence(), _padding())),
    "transformer_layer": (lambda: model.TransformerBlock(32, 4, 8, 8, 64, 0.1, 0.02,
                                                         name="transformer_layer_0"),
                          lambda: (_sequence(), _padding())),
    "transformer_layer_first_only": (
        lambda: model.TransformerBlock(32, 4, 8, 8, 64, 0.1, 0.02, first_only=True,
                                       name="transformer_layer_1"),
        lambda: (_sequence(), _padding())),
    "textcnn": (lambda: model.TextCNNEncoder(32, (2, 3), 16, 0.1, 0.02, name="textcnn"),
                lambda: (_sequence(), _padding())),
    "pooler_max_mean": (lambda: model.Pooler(32, "max_mean", False, 0.02, name="pooler"),
                        lambda: (_sequence(), _padding())),
    "pooler_cls_tanh": (lambda: model.Pooler(32, "cls", True, 0.02, name="pooler"),
                        lambda: (_sequence(), _padding())),
    "nsp_head": (lambda: model.NextSentenceHead(32, name="nsp_head"),
                 lambda: (_sequence()[:, 0],)),
    "classifier_head": (lambda: model.MultiLabelHead(32, 5, 0.1, name="classifier_head"),
                        lambda: (_sequence()[:, 0],)),
    "bag_of_words": (lambda: model.BagOfWordsLogits(50, 5, name="bag_of_words"),
                     lambda: (random_ids(2, 6),)),
    "bag_of_words_ngrams": (lambda: model.BagOfWordsLogits(50, 5, 3, 4, name="bag_of_words"),
                            lambda: (random_ids(2, 6),)),
    "mlm_head": (lambda: model.MaskedLMHead(_built_embedding(), name="mlm_head"),
                 lambda: (_sequence(), np.array([[1, 4], [0, 3]], np.int32))),
}


def test_bag_of_words_logits_are_scikit_learns_tf_idf_times_the_kernel():
    from sklearn.feature_extraction.text import TfidfVectorizer

    rng = np.random.default_rng(0)
    ids = np.zeros((8, 24), np.int32)
    for row in range(8):
        length = rng.integers(3, 20)
        ids[row, :length] = rng.integers(1, 14, length)  # some [UNK] [CLS] [SEP] [MASK] too
    ids[:, 0] = 2
    ids[7, 1:] = 1  # nothing but [UNK]: no words, logits 0
    words = [" ".join(f"w{i}" for i in row if i >= model.FIRST_WORD_ID) for row in ids]
    vectorizer = TfidfVectorizer(token_pattern=r"\S+", sublinear_tf=True)
    tf_idf = vectorizer.fit_transform(words).toarray()
    classifier = model.build_classifier(model.build_backbone(tiny_config("textcnn", vocab_size=14)),
                                        3, 0.1, bag_of_words=True)
    model.set_document_frequencies(classifier, ids)
    layer = classifier.get_layer("bag_of_words")
    kernel = rng.normal(size=(14, 3)).astype(np.float32)
    layer.kernel.assign(kernel)
    columns = [int(name[1:]) for name in vectorizer.get_feature_names_out()]
    np.testing.assert_allclose(layer(ids), tf_idf @ kernel[columns], atol=1e-5)
    padded = np.pad(ids, [[0, 0], [0, 8]])
    np.testing.assert_allclose(layer(padded), layer(ids), atol=1e-6)


def test_bag_of_words_n_grams_are_scikit_learns_with_the_same_vocabulary():
    """Words and the 2- and 3-grams found in 2 rows or more, as TfidfVectorizer computes them
    with that vocabulary; an n-gram never spans a special id ([UNK] and the like) or [PAD]."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    rng = np.random.default_rng(1)
    ids = np.zeros((12, 20), np.int32)
    for row in range(12):
        length = rng.integers(4, 20)
        ids[row, :length] = rng.choice([0, 1, 5, 6, 7, 8, 9], length, p=[0.05] * 2 + [0.18] * 5)
    ids[:, 0] = 2
    ids[11, 1:] = 1
    ngrams = model.ngram_vocabulary(ids, 3)
    assert np.all(np.diff(ngrams) > 0) and len(ngrams) > 20
    classifier = model.build_classifier(model.build_backbone(tiny_config("textcnn", vocab_size=10)),
                                        3, 0.1, bag_of_words=True, ngram_size=3,
                                        num_ngrams=len(ngrams))
    model.set_document_frequencies(classifier, ids, ngrams)
    layer = classifier.get_layer("bag_of_words")
    kernel = rng.normal(size=(10 + len(ngrams), 3)).astype(np.float32)
    layer.kernel.assign(kernel)

    def words_of(key: int) -> str:
        digits = []
        while key:
            key, digit = divmod(key, model.NGRAM_BASE)
            digits.insert(0, str(digit))
        return " ".join(digits)

    def features(text: str) -> list[str]:
        """The words and 1- to 3-grams of each run of words between special ids."""
        out = []
        for run in re.split(r"\b[0-4]\b", text):
            words = run.split()
            out += [" ".join(words[i:i + n]) for n in (1, 2, 3) for i in range(len(words) - n + 1)]
        return out

    vocabulary = [str(i) for i in range(5, 10)] + [words_of(int(key)) for key in ngrams]
    texts = [" ".join(map(str, row)) for row in ids]
    tf_idf = TfidfVectorizer(analyzer=features, sublinear_tf=True,
                             vocabulary=vocabulary).fit_transform(texts).toarray()
    np.testing.assert_allclose(layer(ids), tf_idf @ kernel[5:], atol=1e-5)
    np.testing.assert_allclose(layer(np.pad(ids, [[0, 0], [0, 5]])), layer(ids), atol=1e-6)


@pytest.mark.parametrize("case", LAYER_CASES)
def test_every_layer_re_created_from_its_config_computes_the_same(case):
    make_layer, make_inputs = LAYER_CASES[case]
    layer, inputs = make_layer(), make_inputs()
    expected = keras.ops.convert_to_numpy(layer(*inputs))
    config = layer.get_config()
    again = type(layer).from_config(config)
    again(*inputs)  # builds it
    again.set_weights(layer.get_weights())
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(again(*inputs)), expected)
    assert json.dumps(again.get_config(), sort_keys=True, default=str) == json.dumps(
        config, sort_keys=True, default=str)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_attention_dropout_drops_at_its_rate_keeps_the_mean_and_routes_gradients(rate):
    layer = model.AttentionDropout(rate, seed=1)
    x = tf.ones([4, 8, 125, 125])  # an odd number of elements a batch row is fine too
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
    dropped = keras.ops.convert_to_numpy(y) == 0
    assert abs(dropped.mean() - rate) < 0.005
    assert abs(float(tf.reduce_mean(y)) - 1.0) < 0.01
    kept_value = 1 / (1 - round(rate * 65536) / 65536)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(y)[~dropped], kept_value, rtol=1e-6)
    gradient = keras.ops.convert_to_numpy(tape.gradient(y, x))
    np.testing.assert_array_equal(gradient == 0, dropped)  # no gradient through a dropped one
    assert not np.array_equal(keras.ops.convert_to_numpy(layer(x, training=True)) == 0, dropped)
    np.testing.assert_array_equal(layer(x, training=False), x)
    odd = tf.ones([3, 5, 7])
    assert layer(odd, training=True).shape == odd.shape


def test_config_json_round_trip_presets_and_errors(tmp_path):
    config = model.config_from_preset("small", backbone="transformer", vocab_size=99,
                                      num_layer=None)
    assert (config.d_model, config.d_k, config.num_header, config.num_layer, config.d_ff) == (
        128, 16, 8, 6, 512)
    assert model.config_from_preset("tiny").d_model == 64
    assert model.config_from_preset("big").d_k == 64
    write_config(config, tmp_path / "config.json")
    assert model.ModelConfig.from_json(str(tmp_path / "config.json")) == config
    with pytest.raises(model.ConfigError, match="max_position"):
        config.check_sequence_length(config.max_position + 1)
    with pytest.raises(model.ConfigError, match="--backbone"):
        model.ModelConfig(backbone="lstm")
    with pytest.raises(model.ConfigError, match="dropout"):
        model.ModelConfig(dropout=1.0)


# ------------------------------------------------------------------------ save / load
def save(net, config, directory) -> tuple[str, str]:
    """config.json + backbone.weights.h5 in `directory`, as a pretraining run leaves them."""
    config_file, weights_file = str(
        directory / "config.json"), str(directory / "backbone.weights.h5")
    write_config(config, config_file)
    net.save_weights(weights_file)
    return config_file, weights_file


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("bag_of_words", [False, True])
def test_a_classifier_whose_last_block_computes_cls_alone_scores_the_same(backbone, bag_of_words,
                                                                         tmp_path):
    """predict.py's classifier (build_scoring_classifier: the backbone's first_position_only)
    reads the full one's weight file and gives the same logits, padding and all; its sequence
    output is the [CLS] row (TextCNN: every row)."""
    config = tiny_config(backbone, dropout=0.1)
    full = model.build_classifier(model.build_backbone(config), 7, 0.1, bag_of_words)
    full.save_weights(str(tmp_path / "classifier.weights.h5"))
    fast = model.build_scoring_classifier(config, 7, 0.1, bag_of_words)
    fast.load_weights(str(tmp_path / "classifier.weights.h5"))
    fast_backbone = fast.get_layer("backbone")
    ids = random_ids(3, 11)
    ids[1, 6:] = 0
    x = inputs_for(ids)
    np.testing.assert_allclose(fast(x, training=False).numpy(), full(x, training=False).numpy(),
                               atol=1e-5)
    rows = fast_backbone(x)["sequence_output"].shape[1]
    assert rows == (1 if backbone == "transformer" else 11)
    again = keras.Model.from_config(fast_backbone.get_config())
    assert again(x)["sequence_output"].shape[1] == rows
    fixed = keras.Input(shape=(11, 32))  # a known length is declared as what the block gives
    assert fast_backbone.get_layer("textcnn" if backbone == "textcnn" else "transformer_layer_1")(
        fixed, keras.Input(shape=(11,), dtype="int32")).shape[1] == rows


def test_a_classifier_whose_last_block_computes_cls_alone_trains_the_same_model(tmp_path):
    """The classifiers train with the [CLS]-only last block: with the same seeds, a training-mode
    step draws the dropout masks the whole block would, so logits and every gradient match the
    whole block's (the other positions' outputs feed nothing)."""
    config = tiny_config("transformer", dropout=0.3)
    full, fast = seeded_twins(
        lambda rows_only: model.build_classifier(model.build_backbone(config, rows_only), 5, 0.3),
        tmp_path)
    ids = random_ids(4, 13)
    ids[2, 5:] = 0
    x = inputs_for(ids)
    (full_logits, full_grads), (fast_logits, fast_grads) = (
        outputs_and_gradients(net, x, lambda out: tf.reduce_sum(out * np.arange(5.0)))
        for net in (full, fast))
    np.testing.assert_allclose(fast_logits, full_logits, atol=1e-5)
    assert not np.allclose(fast_logits, fast(x, training=False).numpy(), atol=1e-3)  # dropped
    for variable, expected, got in zip(full.trainable_variables, full_grads, fast_grads):
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=variable.path)


def seeded_twins(build, directory) -> list[keras.Model]:
    """build(False) and build(True) (whole last block, rows alone), made under the same seeds
    (so their dropout layers draw alike) and holding the same weights."""
    nets = []
    for rows_only in (False, True):
        keras.utils.set_random_seed(7)
        nets.append(build(rows_only))
    nets[0].save_weights(str(directory / "twin.weights.h5"))
    nets[1].load_weights(str(directory / "twin.weights.h5"))
    return nets


def outputs_and_gradients(net: keras.Model, x: dict, loss_of) -> tuple[dict, list]:
    """A training-mode call of `net` on x; its outputs and the gradients of loss_of(outputs)
    (arrays; None for a variable the loss does not reach)."""
    with tf.GradientTape() as tape:
        outputs = net(x, training=True)
        loss = loss_of(outputs)
    gradients = tape.gradient(loss, net.trainable_variables)
    return outputs, [None if g is None else tf.convert_to_tensor(g).numpy() for g in gradients]


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("use_nsp", [False, True])
def test_a_backbone_computing_the_masked_positions_alone_trains_the_same_model(backbone, use_nsp,
                                                                              tmp_path):
    """train_bert_lm.py's backbone (`output_positions`: the Transformer's last block computes
    [CLS] and the masked positions alone) gives the whole backbone's masked-LM and NSP logits
    and gradients in training (same seeds, so the same dropout), and saves a weight file that a
    plain backbone loads strictly."""
    config = tiny_config(backbone, dropout=0.3)
    nets = seeded_twins(lambda rows_only: model.build_pretraining_model(
        model.build_backbone(config, output_positions=rows_only), use_nsp), tmp_path)
    whole, fast = nets
    ids = random_ids(4, 13)
    ids[2, 5:] = 0
    x = {**inputs_for(ids), "masked_positions": np.array(
        [[1, 3, 3], [2, 5, 0], [4, 1, 0], [12, 11, 10]], np.int32)}  # repeats, padding's 0
    x["segment_ids"][:, 7:] = 1

    def loss_of(outputs):
        weighted = tf.reduce_sum(outputs["mlm"][..., :9] * np.arange(9, dtype=np.float32))
        return weighted + (tf.reduce_sum(outputs["nsp"] * [1.0, -2.0]) if use_nsp else 0.0)

    (whole_out, whole_grads), (fast_out, fast_grads) = (outputs_and_gradients(net, x, loss_of)
                                                        for net in nets)
    assert fast_out["mlm"].shape == (4, 3, 50)
    for name in whole_out:
        np.testing.assert_allclose(fast_out[name], whole_out[name], atol=1e-5)
    for variable, expected, got in zip(whole.trainable_variables, whole_grads, fast_grads):
        assert (got is None) == (expected is None), variable.path
        if expected is not None:
            np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=variable.path)
    with pytest.raises(ValueError, match="give one of them"):
        model.build_backbone(config, first_position_only=True, output_positions=True)
    fast.backbone.save_weights(str(tmp_path / "backbone.weights.h5"))
    write_config(config, tmp_path / "config.json")
    loaded, _ = model.load_backbone(str(tmp_path / "config.json"),
                                    str(tmp_path / "backbone.weights.h5"))
    np.testing.assert_allclose(loaded(inputs_for(ids))["pooled_output"],
                               whole.backbone(inputs_for(ids))["pooled_output"], atol=1e-5)


def write_config(config, path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config.to_dict(), f)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_save_then_load_gives_identical_outputs(backbone, tmp_path):
    config = tiny_config(backbone)
    net = model.build_backbone(config)
    loaded, loaded_config = model.load_backbone(*save(net, config, tmp_path),
                                                expected_vocab_size=50)
    assert loaded_config == config
    x = inputs_for(random_ids(2, 6))
    for key in ("sequence_output", "pooled_output"):
        np.testing.assert_array_equal(net(x)[key].numpy(), loaded(x)[key].numpy())


def test_loading_fails_loudly_on_any_mismatch(tmp_path):
    config = tiny_config("transformer")
    files = save(model.build_backbone(config), config, tmp_path)
    with pytest.raises(model.BackboneMismatchError, match="vocab_size 50 .* 60 tokens"):
        model.load_backbone(*files, expected_vocab_size=60)
    # a config.json that no longer matches the weights beside it
    write_config(tiny_config("transformer", d_ff=48), files[0])
    with pytest.raises(model.BackboneMismatchError, match="shape of"):
        model.load_backbone(*files)
    write_config(tiny_config("transformer", num_layer=3), files[0])
    with pytest.raises(model.BackboneMismatchError, match="missing"):
        model.load_backbone(*files)
    with pytest.raises(model.BackboneMismatchError, match="train_bert_lm.py"):
        model.load_backbone(str(tmp_path / "nowhere.json"), files[1])


# ------------------------------------------------------------------ mixed precision
@pytest.fixture
def mixed_bfloat16():
    """Keras' global dtype policy set to mixed_bfloat16 for one test, then float32 again."""
    train_util.set_precision("bfloat16")
    try:
        yield
    finally:
        train_util.set_precision("off")


@pytest.mark.parametrize("backbone", BACKBONES)
def test_mixed_bfloat16_keeps_weights_logits_and_weight_files_float32(backbone, tmp_path,
                                                                      mixed_bfloat16):
    """Layers compute in bfloat16; weights, logits and losses stay float32, so a backbone
    trained this way loads into a float32 model and scores (nearly) alike."""
    config = tiny_config(backbone)
    pretrainer = model.build_pretraining_model(model.build_backbone(config), use_nsp=True)
    model.compile_pretraining_model(pretrainer, keras.optimizers.Adam(1e-3), True)
    ids = random_ids(4, 8)
    x = {**inputs_for(ids), "masked_positions": np.array([[1, 2]] * 4, np.int32)}
    outputs = pretrainer(x)
    assert pretrainer.backbone(inputs_for(ids))["sequence_output"].dtype == tf.bfloat16
    assert outputs["mlm"].dtype == tf.float32 and outputs["nsp"].dtype == tf.float32
    logs = pretrainer.train_on_batch(x, {"mlm": ids[:, 1:3], "nsp": np.array([0, 1, 0, 1])},
                                     return_dict=True)
    assert np.isfinite(logs["loss"])
    assert {w.dtype for w in pretrainer.weights} == {"float32"}

    classifier = model.build_classifier(pretrainer.backbone, 3, 0.0, bag_of_words=True)
    model.set_document_frequencies(classifier, ids)
    assert classifier(inputs_for(ids)).dtype == tf.float32
    files = save(pretrainer.backbone, config, tmp_path)
    mixed_pooled = pretrainer.backbone(inputs_for(ids))["pooled_output"].numpy()
    train_util.set_precision("off")
    loaded, _ = model.load_backbone(*files)
    assert {w.dtype for w in loaded.weights} == {"float32"}
    pooled = loaded(inputs_for(ids))["pooled_output"].numpy()
    np.testing.assert_allclose(pooled, mixed_pooled.astype(np.float32), atol=0.1, rtol=0.05)
    train_util.set_precision("bfloat16")
    # as the scripts build them: the last block computes the rows the head reads
    fast = model.build_pretraining_model(model.build_backbone(config, output_positions=True),
                                         use_nsp=True)
    model.compile_pretraining_model(fast, keras.optimizers.Adam(1e-3), True)
    assert {o.dtype for o in fast(x).values()} == {tf.float32}
    assert np.isfinite(fast.train_on_batch(x, {"mlm": ids[:, 1:3], "nsp": np.array([0, 1, 0, 1])},
                                           return_dict=True)["loss"])
    classifier = model.build_classifier(model.build_backbone(config, first_position_only=True),
                                        3, 0.1)
    model.compile_classifier(classifier, keras.optimizers.Adam(1e-3))
    assert np.isfinite(classifier.train_on_batch(inputs_for(ids), np.eye(3)[[0, 1, 2, 0]]))


@pytest.mark.slow
@pytest.mark.parametrize("backbone", BACKBONES)
def test_toy_task_is_learnt_in_mixed_bfloat16(backbone, mixed_bfloat16):
    test_toy_task_is_learnt_by_both_backbones(backbone)


# ----------------------------------------------------------------------------- XLA
@pytest.mark.slow
@pytest.mark.parametrize("backbone", BACKBONES)
def test_trains_a_step_under_xla(backbone):
    """The models the scripts compile with --jit_compile, which the default tier trains without
    XLA (each compile here is 15 s): the pretraining model as train_bert_lm.py builds it (the
    last block computing the masked rows alone), and the classifier as the scripts build it."""
    ids = random_ids(4, 8)
    x = {**inputs_for(ids), "masked_positions": np.array([[1, 2]] * 4, np.int32)}
    y = {"mlm": ids[:, 1:3], "nsp": np.array([0, 1, 0, 1], np.int32)}
    pretrainer = model.build_pretraining_model(
        model.build_backbone(tiny_config(backbone), output_positions=True), use_nsp=True)
    model.compile_pretraining_model(pretrainer, keras.optimizers.Adam(1e-3), True, True)
    logs = pretrainer.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"]) and "mlm_accuracy" in logs and "nsp_accuracy" in logs
    # with the bag-of-words model and its n-grams (a binary search in the graph)
    rows = random_ids(16, 8, vocab_size=12)
    ngrams = model.ngram_vocabulary(rows, 3)
    classifier = model.build_classifier(
        model.build_backbone(tiny_config(backbone), first_position_only=True), 3, 0.1,
        bag_of_words=True, ngram_size=3, num_ngrams=len(ngrams))
    model.set_document_frequencies(classifier, rows, ngrams)
    model.compile_classifier(classifier, keras.optimizers.Adam(1e-3), True)
    assert np.isfinite(classifier.train_on_batch(inputs_for(ids), np.eye(3)[[0, 1, 2, 0]]))


def test_training_batches_group_lengths_and_cover_every_example_once():
    rng = np.random.default_rng(9)
    lengths = rng.integers(1, 41, 300)
    ids = np.zeros((300, 40), np.int32)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(5, 50, length)
    ids[:, 0] = 2
    gold = np.eye(3, dtype=np.uint8)[np.arange(300) % 3]
    data = classifier_task.ClassificationData(None, ["a", "b", "c"], "space",
                                              {"train": (ids, gold)}, batch_size=8,
                                              sequence_length=40)
    seen, padded_widths = [], []
    batches = list(data.training_dataset(seed=1))
    assert len(batches) == data.steps_per_epoch() <= 300 // 8 + 8
    for features, labels in batches:
        mask = features["padding_mask"].numpy()
        real = mask.sum(axis=1)
        assert features["token_ids"].shape[1] == -(-real.max() // 8) * 8  # cut, then rounded
        seen += [tuple(row[:n]) for row, n in zip(features["token_ids"].numpy(), real)]
        padded_widths.append(features["token_ids"].shape[1])
    assert sorted(seen) == sorted(tuple(row[:n]) for row, n in zip(ids, lengths))
    assert np.mean(padded_widths) < 0.8 * 40  # random batches of 8 would be nearly 40 wide


def test_automatic_sequence_length_keeps_most_examples_whole(tmp_path, capsys):
    assert classifier_task.choose_sequence_length(np.arange(1, 101), 512) == 96
    assert classifier_task.choose_sequence_length(np.full(50, 3), 512) == 8
    assert classifier_task.choose_sequence_length(np.full(50, 900), 512) == 512
    words = [f"w{i}" for i in range(60)]
    lines = [" ".join(words[:n]) + " __label__" + "ab"[n % 2] for n in range(1, 41)]
    files = {}
    longest = " ".join(words) + " __label__a"
    for split, rows in (("train", lines), ("valid", lines[::-1] + [longest])):
        files[split] = str(tmp_path / f"{split}.txt")
        open(files[split], "w", encoding="utf-8").write("\n".join(rows) + "\n")
    settings = classifier_task.ClassifierSettings(cache_dir=str(tmp_path / "cache"),
                                                  process_num=1)
    data = classifier_task.load_data(files, "space", settings, vocab_size=100,
                                     max_sequence_length=64)
    # [CLS] + up to 40 words: 95% of the rows fit in 40, rounded up to 40; the longest valid
    # row is cut there
    assert data.sequence_length == 40 and "sequence length 40 (automatic" in capsys.readouterr().out
    assert {ids.shape[1] for ids, _ in data.splits.values()} == {40}
    given = classifier_task.load_data(
        files, "space", classifier_task.ClassifierSettings(
            sequence_length=40, cache_dir=settings.cache_dir, process_num=1), vocab=data.vocab)
    for split in files:
        assert np.array_equal(given.splits[split][0], data.splits[split][0])
    capsys.readouterr()
    capped = classifier_task.load_data(files, "space", settings, vocab=data.vocab,
                                       max_sequence_length=16)
    # rows filling the cap may have been longer: counted as cut (1 to 14 words fit whole)
    assert capped.sequence_length == 16 and "35% of the training" in capsys.readouterr().out


def word_label_data(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] + 11 random words (ids 10-59), among which word 5 marks label 0 and word 6 label 1."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, 60, size=(rows, 12)).astype(np.int32)
    gold = rng.integers(0, 2, size=(rows, 2)).astype(np.uint8)
    ids[:, 1] = np.where(gold[:, 0], 5, ids[:, 1])
    ids[:, 2] = np.where(gold[:, 1], 6, ids[:, 2])
    ids[:, 0] = data_util.CLS_ID
    return ids, gold


def test_bag_of_words_rate_is_chosen_on_valid_and_the_seed_restored(capsys):
    vocab = data_util.Vocabulary(list(data_util.SPECIAL_TOKENS)
                                 + [f"w{i}" for i in range(60 - len(data_util.SPECIAL_TOKENS))])
    data = classifier_task.ClassificationData(
        vocab, ["a", "b"], "space",
        {"train": word_label_data(256, 0), "valid": word_label_data(128, 1)}, 32, 12)
    settings = classifier_task.ClassifierSettings()
    # the linear model alone learns the marker words in its few trial epochs (the priors
    # alone: 0.67 at best)
    assert classifier_task.bag_of_words_trial(data, 10.0, 3, 10, settings)[-1] > 0.85
    keras.utils.set_random_seed(settings.seed)
    expected = keras.random.uniform((4,), seed=keras.random.SeedGenerator(0)).numpy()
    chosen = classifier_task.choose_bag_of_words_rate(data, 10, settings)
    assert chosen.bag_of_words_learning_rate in classifier_task.BAG_OF_WORDS_RATES
    assert f"bag-of-words rate {chosen.bag_of_words_learning_rate:g} (valid F1" in \
        capsys.readouterr().out
    after = keras.random.uniform((4,), seed=keras.random.SeedGenerator(0)).numpy()
    assert np.array_equal(after, expected)
    # a rate given, or no bag of words, is left alone without a trial
    for given in (dataclasses.replace(settings, bag_of_words_learning_rate=3.0),
                  dataclasses.replace(settings, bag_of_words=False)):
        assert classifier_task.choose_bag_of_words_rate(data, 10, given) is given
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="choose_bag_of_words_rate"):
        classifier_task.build_and_compile(
            model.build_backbone(tiny_config("textcnn", vocab_size=60)),
            *data.splits["train"], 2, 8, settings)


def test_characters_bring_their_n_grams_into_the_bag_of_words_by_default_words_do_not():
    vocab = data_util.Vocabulary(list(data_util.SPECIAL_TOKENS)
                                 + [f"w{i}" for i in range(60 - len(data_util.SPECIAL_TOKENS))])
    given_rate = classifier_task.ClassifierSettings(bag_of_words_learning_rate=10.0)
    for style, size in (("char", 3), ("space", 1)):
        data = classifier_task.ClassificationData(
            vocab, ["a", "b"], style,
            {"train": word_label_data(256, 0), "valid": word_label_data(128, 1)}, 32, 12)
        settings = classifier_task.choose_data_settings(data, 10, given_rate)
        assert settings.bag_of_words_ngrams == size
        classifier = classifier_task.build_and_compile(
            model.build_backbone(tiny_config("textcnn", vocab_size=60)),
            *data.splits["train"], 2, 8, settings)
        layer = classifier.get_layer("bag_of_words")
        assert layer.ngram_size == size and (layer.num_ngrams > 100) == (size > 1)


TWO_REPLICA_LOSS = """
import sys
sys.path.insert(0, sys.argv[1])
import train_util
if sys.argv[2] == "mirrored":
    train_util.split_cpu_for_testing(2)
import keras, numpy as np, model, pretrain_task
ids = np.random.default_rng(0).integers(5, 200, (128, 16)).astype(np.int32)
data = pretrain_task.make_pretraining_dataset(ids, 200, 32, shuffle=False, fixed_masks=True)
keras.utils.set_random_seed(1)
with train_util.get_distribution_strategy(sys.argv[2]).scope():
    config = model.config_from_preset("tiny", backbone="textcnn", vocab_size=200, max_position=64)
    pretrainer = model.build_pretraining_model(model.build_backbone(config))
    model.compile_pretraining_model(pretrainer, keras.optimizers.Adam(1e-3))
print("LOSS", pretrainer.evaluate(data, verbose=0, return_dict=True)["mlm_loss"])
"""


@pytest.mark.slow
def test_masked_lm_loss_is_the_same_on_two_replicas():
    """Under MirroredStrategy with 2 replicas (2 logical CPUs, so a process of its own) the
    logged masked-LM loss is the one-device figure, not the sum over replicas."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    losses = {}
    for strategy in ("one_device", "mirrored"):
        done = subprocess.run([sys.executable, "-c", TWO_REPLICA_LOSS, root, strategy],
                              capture_output=True, text=True, timeout=300)
        lines = [line for line in done.stdout.splitlines() if line.startswith("LOSS ")]
        assert lines, done.stderr[-2000:]
        losses[strategy] = float(lines[-1].split()[1])
    assert losses["mirrored"] == pytest.approx(losses["one_device"], rel=0.02)
    assert losses["one_device"] == pytest.approx(np.log(200), rel=0.1)
