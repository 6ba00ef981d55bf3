"""Label new text with a fine-tuned (or from-scratch) classifier run directory.

    echo "中国 政府 今天 在 北京 宣布" | python predict.py --ckpt_dir=runs/ft
    python predict.py --ckpt_dir=runs/ft --input_file=new.txt --min_prob=0.1 > predictions.jsonl
    python predict.py --ckpt_dir=runs/ft --export_dir=exported/ft/1   # SavedModel for TF Serving

Input: one document a line, tokenized as the run was trained (see its data_config.json); any
`__label__` part is ignored, so a labelled file can be predicted as it is. Output: one JSON object
a line: {"line": n, "labels": [...], "probabilities": {label: p, ...}} with every label whose
probability is at least --min_prob. Labels are chosen by the run's decision rule: its per-label
thresholds (thresholds.json, tuned on validation) when it has them, else the original's rule (every
label with p >= 0.5); when no label passes, the one nearest its threshold. --decision_rule=half
forces the original's rule.

--export_dir writes a SavedModel (see serving.py) whose default signature takes text and applies
the same tokenization, vocabulary and decision rule in the graph; a second signature,
serve_token_ids, takes the token ids a client computed itself.
"""
import cli  # first: it keeps TensorFlow's C++ start-up lines off the terminal

import itertools
import json
import os
import sys

import numpy as np
from absl import app, flags

import data_util_hdf5 as data_util
import model
import run_directory
import serving

FLAGS = flags.FLAGS
flags.DEFINE_string("ckpt_dir", "runs/ft", "Run directory written by train_bert_fine_tuning.py "
                    "(--ckpt_dir_save) or train_transform.py.")
flags.DEFINE_string("input_file", None, "Text to label, one document a line. Default: stdin.")
flags.DEFINE_string("encoding", "utf-8", "Text encoding of --input_file, e.g. gb18030.")
flags.DEFINE_float("min_prob", 0.05, "Report every label with at least this probability.")
flags.DEFINE_enum("decision_rule", "run", ["run", "half"], "'run': the run directory's tuned "
                  "thresholds (thresholds.json) if it has them, else p >= 0.5; 'half': p >= 0.5.")
flags.DEFINE_integer("batch_size", 256, "Documents scored per batch.")
flags.DEFINE_boolean("test_mode", False, "Label only the first 100 documents, to try a run "
                     "directory quickly; --ckpt_dir then defaults to runs/test_ft, where "
                     "train_bert_fine_tuning.py --test_mode=True writes.")
flags.DEFINE_string("export_dir", None, "Write a TensorFlow SavedModel here and stop: signature "
                    "'serving_default' takes string text [batch] (tokenized in the graph as the "
                    "run was trained; a 'word' run wants text segmented by jieba), "
                    "'serve_token_ids' int32 token_ids [batch, length]; both return "
                    "probabilities, label_ids (multi-hot, --decision_rule) and label names.")
flags.DEFINE_boolean("export_jit_compile", False, "With --export_dir: compile the exported "
                     "network with XLA. Batch-1 latency at 200 tokens on a 2-core AVX-512 CPU: "
                     "Transformer small 7.4 ms against 10.2, TextCNN small 2.2 against 2.6 "
                     "(batch 64: the Transformer 0.97x). The first request of each new (batch "
                     "size rounded up to a power of two, length rounded up to 8 tokens) compiles "
                     "a program, about 1 s on a CPU, so warm the server up with the shapes it "
                     "will see.")


class Predictor:
    """A classifier run directory, ready to turn text into label probabilities."""

    def __init__(self, run_dir: str):
        run = run_directory.open_finished(run_dir, "classifier", "--ckpt_dir")
        self.vocab = data_util.Vocabulary.load(run.verified(run_directory.VOCAB))
        self.labels = data_util.load_label_list(run.verified(run_directory.LABELS))
        info = run.read_json_object(run_directory.DATA_CONFIG)
        try:
            self.tokenize_style = info["tokenize_style"]
            self.sequence_length, dropout = int(info["sequence_length"]), float(info["dropout"])
        except (KeyError, TypeError, ValueError):
            raise data_util.DataError(f"{run.file(run_directory.DATA_CONFIG)}: needs "
                                      "tokenize_style, sequence_length and dropout; train "
                                      "again") from None
        self.thresholds = self._read_thresholds(run)
        config = model.ModelConfig.from_json(run.verified(run_directory.CONFIG))
        # runs from before the bag-of-words model have no key: they had none
        self.classifier = model.build_scoring_classifier(
            config, len(self.labels), dropout, bool(info.get("bag_of_words", False)),
            int(info.get("bag_of_words_ngrams") or 1), int(info.get("bag_of_words_num_ngrams", 0)))
        weights = run.verified(run_directory.CLASSIFIER_WEIGHTS)
        try:
            self.classifier.load_weights(weights)
        except (OSError, ValueError) as error:
            raise data_util.DataError(f"{weights} does not fit its config.json "
                                      f"({str(error).splitlines()[0][:120]}); the run directory "
                                      "mixes files of different runs, train it again") from None

    def _read_thresholds(self, run: run_directory.Run) -> np.ndarray | None:
        """Per-label thresholds in labels.txt order, or None (p >= 0.5) when the run has none."""
        if not os.path.exists(run.file(run_directory.THRESHOLDS)):
            return None
        path = run.verified(run_directory.THRESHOLDS)
        saved = run_directory.read_json_file(path).get("thresholds")
        if not isinstance(saved, dict) or sorted(saved) != sorted(self.labels):
            raise data_util.DataError(f"{path} names other labels than labels.txt beside it; "
                                      "the run directory mixes files of different runs, train "
                                      "it again")
        return np.array([saved[label] for label in self.labels])

    def decision_thresholds(self, rule: str = "run") -> np.ndarray | None:
        """rule 'run': the run's thresholds (None if it has none); 'half': None (p >= 0.5)."""
        return self.thresholds if rule == "run" else None

    def choose(self, probabilities: np.ndarray, rule: str = "run") -> np.ndarray:
        """Multi-hot [N, labels]: the run's decision rule, or p >= 0.5 with rule='half'."""
        return model.predict_labels(probabilities, self.decision_thresholds(rule))

    def encode(self, texts: list[str]) -> np.ndarray:
        rows = [data_util.encode_example(
                    data_util.tokenize(data_util.parse_label_line(text)[0], self.tokenize_style),
                    self.vocab, self.sequence_length)
                for text in texts]
        return np.array(rows, np.int32)

    def probabilities(self, texts: list[str]) -> np.ndarray:
        return model.predict_probabilities(self.classifier, self.encode(texts), 64)

    def export(self, export_dir: str, rule: str = "run", jit_compile: bool = False) -> None:
        """The SavedModel of serving.py; labels by the run's decision rule, or p >= 0.5."""
        serving.export_classifier(self.classifier, export_dir, self.vocab, self.labels,
                                  self.tokenize_style, self.sequence_length,
                                  self.decision_thresholds(rule), jit_compile)


def read_documents(path: str | None, encoding: str):
    if path is None:
        data_util.check_encoding(encoding)
        yield from data_util.decode_lines(sys.stdin.buffer, "<stdin>", encoding)
    else:
        yield from data_util.read_lines(path, encoding)


def predict_lines(predictor: Predictor, documents, batch_size: int, min_prob: float,
                  rule: str = "run"):
    """Yield one result dict per input line, in order."""
    batch = []
    for item in documents:
        batch.append(item)
        if len(batch) == batch_size:
            yield from _score(predictor, batch, min_prob, rule)
            batch = []
    if batch:
        yield from _score(predictor, batch, min_prob, rule)


def _score(predictor: Predictor, batch: list, min_prob: float, rule: str):
    probs = predictor.probabilities([text for _, text in batch])
    chosen = predictor.choose(probs, rule)
    for (line_no, _), p, c in zip(batch, probs, chosen):
        order = np.argsort(-p)
        yield {"line": line_no, "labels": [predictor.labels[i] for i in order if c[i]],
               "probabilities": {predictor.labels[i]: round(float(p[i]), 4) for i in order
                                 if p[i] >= min_prob}}


def main(_):
    if FLAGS.export_dir and os.path.exists(FLAGS.export_dir) and not os.path.isdir(
            FLAGS.export_dir):
        cli.fail(f"--export_dir={FLAGS.export_dir} is a file; give a directory")
    if FLAGS.export_jit_compile and not FLAGS.export_dir:
        cli.fail("--export_jit_compile=True compiles an export: give --export_dir as well")
    if FLAGS.batch_size < 1:
        cli.fail(f"--batch_size={FLAGS.batch_size} must be at least 1")
    predictor = Predictor(cli.run_dir_flag("ckpt_dir"))
    if FLAGS.export_dir:
        predictor.export(FLAGS.export_dir, FLAGS.decision_rule, FLAGS.export_jit_compile)
        print(f"exported SavedModel to {FLAGS.export_dir}: signature {serving.TEXT_SIGNATURE} "
              f"takes {serving.TEXT_EXPECTED[predictor.tokenize_style]}; "
              f"{serving.TOKEN_IDS_SIGNATURE} takes int32 token ids", file=sys.stderr)
        return
    count = 0
    documents = read_documents(FLAGS.input_file, FLAGS.encoding)
    if FLAGS.test_mode:
        documents = itertools.islice(documents, 100)
    for result in predict_lines(predictor, documents, FLAGS.batch_size, FLAGS.min_prob,
                                FLAGS.decision_rule):
        print(json.dumps(result, ensure_ascii=False), flush=False)
        count += 1
    print(f"predict documents={count} ckpt_dir={cli.run_dir_flag('ckpt_dir')}", file=sys.stderr)


if __name__ == "__main__":
    app.run(cli.guard(main))
