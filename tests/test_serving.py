"""The text SavedModel (serving.py) against predict.py's own path, on real run directories: the
same token ids, the same probabilities (within 1e-5) and the very same labels, for every
tokenize style, awkward whitespace, unknown tokens, empty and over-long lines and __label__ parts.
"""
import os
import shutil
import subprocess
import sys
from typing import NamedTuple

import keras
import numpy as np
import pytest
import tensorflow as tf

import classifier_task
import data_util_hdf5 as data_util
import model
import predict
import run_directory
import serving

LABELS = ["place", "org", "person", "time"]
SEQUENCE_LENGTH = 10
NGRAM_SIZE = 2  # the runs' bag-of-words models count bigrams too: the export must carry them
LONG = " ".join(["北京", "上海", "陌生"] * 12)  # 36 tokens: truncated to SEQUENCE_LENGTH - 1

# What a client sends, per tokenize style; predict.py reads the same lines (word: raw text).
SPACE_LINES = [
    "中国 政府 今天 在 北京 宣布",
    "中国\t政府\u3000今天\xa0在  北京\u2003宣布\u2029\x1c ",  # Python's str.split() whitespace
    "陌生词 中国 Beijing beijing 另一个陌生词",
    "",
    " \t\u3000 ",
    LONG,
    "__label__place 中国 政府 __label__org",
    "北京 foo__label__bar __label__ 上海",
    "[CLS] [UNK] [SEP] 北京",
]
CHAR_LINES = [
    "中国政府今天在北京宣布",
    " 中 国\t政\u3000府\xa0今\n天 ",
    "ＡＢＣ abc ABC，。！ Abc",  # full-width kept as such, case kept: "A" is not "a"
    "陌生字😀\u200b北京",  # a zero-width space is no whitespace in Python either
    "",
    "\u3000 ",
    LONG,
    "__label__place 中国 政府 __label__org",
    "北京x__label__y",
]
WORD_LINES = [
    "中国政府今天在北京宣布一项新政策",
    "我爱北京天安门",
    "他来到了网易杭研大厦",
    "",
    "北京上海" * 12,
    "小明硕士毕业于中国科学院计算所 __label__person __label__org",
]


def segmented(line: str) -> str:
    """What a client of a 'word' run sends: the text segmented by jieba, labels left as they
    were (the graph drops them as predict.py does)."""
    text, labels = data_util.parse_label_line(line)
    words = data_util.tokenize(text, "word")
    return " ".join(words + [data_util.LABEL_PREFIX + label for label in labels])


def vocabulary_of(lines: list[str], style: str, left_out: set[str]) -> data_util.Vocabulary:
    tokens = {token for line in lines
              for token in data_util.tokenize(data_util.parse_label_line(line)[0], style)}
    return data_util.Vocabulary(data_util.SPECIAL_TOKENS
                                + sorted(tokens - left_out - set(data_util.SPECIAL_TOKENS)))


def tiny_classifier(vocab: data_util.Vocabulary, labels: list[str], backbone: str = "textcnn"
                    ) -> tuple[model.ModelConfig, keras.Model]:
    """A seeded random init, wide enough that labels differ between texts."""
    keras.utils.set_random_seed(0)
    config = model.ModelConfig(backbone=backbone, vocab_size=len(vocab), d_model=16,
                               num_filters=8, filter_sizes=(2, 3), num_layer=2, num_header=2,
                               d_k=8, d_v=8, d_ff=32, max_position=32, initializer_range=0.5)
    # the bag-of-words model (with bigrams) starts at zero; random weights and idf make it
    # count in the test
    rng = np.random.default_rng(0)
    word_kernel = rng.normal(0, 0.5, (len(vocab), len(labels)))
    rows = rng.integers(0, len(vocab), (20, 12))
    ngrams = model.ngram_vocabulary(rows, NGRAM_SIZE)  # none over the sample vocabulary
    classifier = model.build_classifier(model.build_backbone(config), len(labels), 0.1,
                                        bag_of_words=True, ngram_size=NGRAM_SIZE,
                                        num_ngrams=len(ngrams))
    kernel = np.concatenate([word_kernel, rng.normal(0, 0.5, (len(ngrams), len(labels)))])
    classifier.get_layer("bag_of_words").kernel.assign(kernel.astype(np.float32))
    model.set_document_frequencies(classifier, rows, ngrams)
    return config, classifier


def save_run(run_dir: str, vocab: data_util.Vocabulary, labels: list[str], style: str,
             thresholds: list[float] | None,
             made: tuple[model.ModelConfig, keras.Model] | None = None) -> str:
    """A finished classifier run written as the training scripts write one; `made`: the
    (config, classifier) of tiny_classifier, else a fresh one."""
    config, classifier = made or tiny_classifier(vocab, labels)
    settings = classifier_task.ClassifierSettings(sequence_length=SEQUENCE_LENGTH, dropout=0.1,
                                                  bag_of_words_ngrams=NGRAM_SIZE)
    data = classifier_task.ClassificationData(vocab, labels, style, {}, settings.batch_size,
                                              SEQUENCE_LENGTH)
    run, _ = run_directory.open_for_training(run_dir, "classifier", {"style": style}, False)
    try:
        classifier_task.save_run_files(run, data, config, settings, classifier)
        run.save_weights(classifier, run_directory.CLASSIFIER_WEIGHTS)
        if thresholds is not None:
            run.write_json(run_directory.THRESHOLDS, {"rule": "test", "thresholds": dict(
                zip(labels, map(float, thresholds)))})
        run.finish({})
    finally:
        run.release()
    return run_dir


def served(loaded, signature: str, **inputs) -> dict:
    out = loaded.signatures[signature](**{k: tf.constant(v) for k, v in inputs.items()})
    return {"probabilities": out["probabilities"].numpy(), "label_ids": out["label_ids"].numpy(),
            "labels": [[name.decode() for name in row if name] for row in out["labels"].numpy()]}


def expected(predictor: predict.Predictor, lines: list[str]) -> dict:
    """predict.py's own answer: its probabilities, decision rule and JSON label lists."""
    probabilities = predictor.probabilities(lines)
    results = predict.predict_lines(predictor, enumerate(lines, 1), 256, 0.0)
    return {"probabilities": probabilities, "label_ids": predictor.choose(probabilities),
            "labels": [result["labels"] for result in results]}


def assert_same(got: dict, want: dict) -> None:
    """Identical labels (multi-hot and names in order), probabilities within 1e-5."""
    assert (got["label_ids"] == want["label_ids"]).all()
    assert got["labels"] == want["labels"]
    assert np.abs(got["probabilities"] - want["probabilities"]).max() < 1e-5


# style: (the lines predict.py reads, tokens left out of the vocabulary, thresholds or None for
# the p >= 0.5 rule)
CASES = {
    "space": (SPACE_LINES, {"陌生词", "另一个陌生词", "陌生", "beijing"}, [0.52, 0.4, 0.9, 0.995]),
    "char": (CHAR_LINES, {"陌", "生", "字", "😀", "\u200b", "A"}, [0.87, 0.45, 0.96, 0.99]),
    "word": (WORD_LINES, {"天安门", "大厦"}, None),
}


def client_lines(style: str) -> list[str]:
    """What a client sends: the very lines, or for a 'word' run the lines segmented by jieba."""
    lines = CASES[style][0]
    return [segmented(line) for line in lines] if style == "word" else lines


@pytest.fixture(scope="module")
def predictor_for(tmp_path_factory):
    """style -> the Predictor of a run of that style, made once for the module."""
    made = {}

    def predictor(style: str) -> predict.Predictor:
        if style not in made:
            lines, left_out, thresholds = CASES[style]
            run_dir = str(tmp_path_factory.mktemp(f"run_{style}"))
            made[style] = predict.Predictor(save_run(
                run_dir, vocabulary_of(lines, style, left_out), LABELS, style, thresholds))
        return made[style]
    return predictor


class Exported(NamedTuple):
    style: str
    sent: list[str]  # what the client sends
    read: list[str]  # what predict.py reads
    predictor: predict.Predictor
    loaded: object  # the SavedModel; it owns the variables, so it lives as long as the test
    want: dict  # predict.py's answer


# A 'word' export is the 'space' graph (whitespace split); its text -> ids step stays in the
# default tier below, its full export in the slow one, so the default tier exports twice.
@pytest.fixture(scope="module",
                params=["char", "space", pytest.param("word", marks=pytest.mark.slow)])
def exported(request, predictor_for, tmp_path_factory) -> Exported:
    style = request.param
    predictor = predictor_for(style)
    export_dir = str(tmp_path_factory.mktemp(f"export_{style}"))
    predictor.export(export_dir)
    read = CASES[style][0]
    return Exported(style, client_lines(style), read, predictor, tf.saved_model.load(export_dir),
                    expected(predictor, read))


def test_the_text_signature_gives_predict_py_answers(exported):
    assert exported.predictor.classifier.get_layer("bag_of_words").num_ngrams > 0
    assert_same(served(exported.loaded, "serving_default", text=exported.sent), exported.want)


@pytest.mark.parametrize("style", sorted(CASES))
def test_the_graph_encodes_text_to_predict_py_token_ids(style, predictor_for):
    predictor = predictor_for(style)
    tokens = serving.tokenize(tf.constant(client_lines(style)), style)
    ids = serving.encode(tokens, serving.vocabulary_table(predictor.vocab), SEQUENCE_LENGTH)
    want = predictor.encode(CASES[style][0])
    assert (ids.numpy() == want).all()
    # the cases reach what they are meant to: unknown tokens, truncation, a bare [CLS]
    assert (want == data_util.UNK_ID).any() and (want[:, -1] != data_util.PAD_ID).any()
    assert ((want != data_util.PAD_ID).sum(axis=1) == 1).any()


def test_the_token_id_signature_answers_as_the_text_one(exported):
    token_ids = exported.predictor.encode(exported.read)
    by_ids = served(exported.loaded, "serve_token_ids", token_ids=token_ids)
    assert_same(by_ids, served(exported.loaded, "serving_default", text=exported.sent))
    assert by_ids["probabilities"].shape == (len(exported.read), len(LABELS))


@pytest.mark.parametrize("backbone", ["textcnn", "transformer"])
def test_an_xla_compiled_export_gives_predict_py_answers(backbone, tmp_path):
    lines, left_out, thresholds = CASES["space"]
    vocab = vocabulary_of(lines, "space", left_out)
    predictor = predict.Predictor(save_run(str(tmp_path / "run"), vocab, LABELS, "space",
                                           thresholds, tiny_classifier(vocab, LABELS, backbone)))
    export_dir = tmp_path / "export"
    predictor.export(str(export_dir), jit_compile=True)
    with open(export_dir / "saved_model.pb", "rb") as graph:
        assert b"_XlaMustCompile" in graph.read()  # the attribute a plain export lacks
    loaded = tf.saved_model.load(str(export_dir))
    # twice: the second batch has other widths, so XLA compiles a second program
    for sent, read in ((client_lines("space"), lines), (client_lines("space")[:2], lines[:2])):
        assert_same(served(loaded, "serving_default", text=sent), expected(predictor, read))


def test_an_xla_export_compiles_one_program_per_batch_bucket():
    """Batches of 3 and 4 rows (same width) share the 4-row program; 5 rows take the 8-row one;
    the padding rows change no real row."""
    config = model.ModelConfig(backbone="transformer", vocab_size=40, d_model=32, num_layer=2,
                               num_header=4, d_k=8, d_v=8, d_ff=64, max_position=64)
    score = serving.probabilities_function(model.build_scoring_classifier(config, 3, 0.1), True)
    ids = np.random.default_rng(0).integers(5, 40, (5, 16)).astype(np.int32)
    ids[:, 0] = data_util.CLS_ID
    alone = [score(tf.constant(ids[i:i + 1])).numpy()[0] for i in range(5)]
    programs = score.compiled.experimental_get_tracing_count()
    for rows, more in ((3, 1), (4, 0), (5, 1)):
        np.testing.assert_allclose(score(tf.constant(ids[:rows])).numpy(), alone[:rows],
                                   atol=1e-5)
        assert score.compiled.experimental_get_tracing_count() == programs + more
        programs += more


def test_the_cases_exercise_the_decision_rule(exported):
    """Some row gets several labels and, where the run has thresholds, some row gets its label
    only as the one nearest its threshold; else the parity above would not cover the rule.
    (The seeded weights give the 'time' label p > 0.95 almost everywhere, hence its threshold.)"""
    probabilities, thresholds = exported.want["probabilities"], exported.predictor.thresholds
    assert (exported.want["label_ids"].sum(axis=1) > 1).any()
    if thresholds is not None:
        assert (~(probabilities >= thresholds).any(axis=1)).any()


def test_the_graph_decision_rule_is_predict_labels():
    rng = np.random.default_rng(0)
    thresholds = np.array([0.3, 0.5, 0.9, 0.95, 0.9, 0.7])
    probabilities = rng.random((400, len(thresholds))).astype(np.float32)
    # float32(0.3) > 0.3 and float32(0.9) < 0.9: a float32 comparison would decide otherwise
    probabilities[:20] = thresholds.astype(np.float32)
    for cut in (thresholds, None):
        chosen = serving.choose(tf.constant(probabilities),
                                model.decision_thresholds(cut, len(thresholds)))
        assert (chosen.numpy() == model.predict_labels(probabilities, cut).astype(bool)).all()


def test_the_signatures_name_their_inputs_and_outputs(exported):
    loaded = exported.loaded
    assert sorted(loaded.signatures) == ["serve_token_ids", "serving_default"]
    for name, (key, dtype) in {"serving_default": ("text", tf.string),
                               "serve_token_ids": ("token_ids", tf.int32)}.items():
        signature = loaded.signatures[name]
        assert signature.structured_input_signature[1][key].dtype == dtype
        assert sorted(signature.structured_outputs) == ["label_ids", "labels", "probabilities"]


def test_the_whitespace_class_is_python_s():
    assert serving.PYTHON_WHITESPACE == "".join(
        chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())


# ----------------------------------------------------------------------------- slow tier
@pytest.mark.slow
def test_the_export_matches_predict_py_on_the_sample_test_split(sample_data, tmp_path):
    """The sample task `entities` (text segmented with spaces) through a tiny untrained run:
    `predict.py --export_dir` in a subprocess, then every line of its test split."""
    files = {split: os.path.join(sample_data, "entities", f"{split}.txt")
             for split in ("train", "valid", "test")}
    vocab = data_util.build_vocabulary([files["train"]], "space", 3000, labelled=True)
    labels = data_util.build_label_list(files["train"])
    made = tiny_classifier(vocab, labels)
    classifier = made[1]
    # each label's 80th percentile on valid: some test lines pass several thresholds, some none
    valid = [data_util.encode_example(
                 data_util.tokenize(data_util.parse_label_line(line)[0], "space"), vocab,
                 SEQUENCE_LENGTH)
             for _, line in data_util.read_lines(files["valid"])]
    valid_probabilities = model.predict_probabilities(classifier, np.array(valid, np.int32), 256)
    thresholds = np.quantile(valid_probabilities, 0.8, axis=0).round(2)
    run_dir = save_run(str(tmp_path / "run"), vocab, labels, "space", thresholds, made)
    export_dir = str(tmp_path / "export")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exporting = subprocess.run([sys.executable, os.path.join(root, "predict.py"),
                                f"--ckpt_dir={run_dir}", f"--export_dir={export_dir}"],
                               cwd=root, check=True, capture_output=True, text=True, timeout=600)
    assert f"serving_default takes {serving.TEXT_EXPECTED['space']}" in exporting.stderr
    lines = [line for _, line in data_util.read_lines(files["test"])]
    want = expected(predict.Predictor(run_dir), lines)
    got = served(tf.saved_model.load(export_dir), "serving_default", text=lines)
    identical = int((got["label_ids"] == want["label_ids"]).all(axis=1).sum())
    difference = float(np.abs(got["probabilities"] - want["probabilities"]).max())
    fallback = int((~(want["probabilities"] >= thresholds).any(axis=1)).sum())
    print(f"\nserving_parity lines={len(lines)} labels_identical={identical}/{len(lines)} "
          f"max_prob_diff={difference:.3g} label_sets={len(set(map(tuple, got['labels'])))} "
          f"nearest_threshold_rows={fallback}")
    assert_same(got, want)
    assert_saved_model_cli_lists_both_signatures(export_dir)


def assert_saved_model_cli_lists_both_signatures(export_dir: str) -> None:
    """The console script installed with tensorflow, as a TF Serving user would check."""
    command = shutil.which("saved_model_cli") or os.path.join(os.path.dirname(sys.executable),
                                                              "saved_model_cli")
    shown = subprocess.run([command, "show", "--dir", export_dir, "--all"], capture_output=True,
                           text=True, check=True, timeout=600).stdout
    text_signature = shown[shown.index("signature_def['serving_default']"):]
    assert "inputs['text']" in text_signature and "DT_STRING" in text_signature
    assert "signature_def['serve_token_ids']" in shown and "inputs['token_ids']" in shown
