"""How much does a pretrained backbone already know about a task, before any fine-tuning?

    python benchmarks/probe_features.py --pretrained_dir=benchmarks/work/lm_textcnn \
        --train=benchmarks/work/sentiment/train_small.txt --valid=data/sentiment/valid.txt

A linear probe: the frozen backbone turns each text into a vector (its pooled output, and the
mean of its token embeddings), a logistic regression is fitted on the training lines and scored
on valid (accuracy of the first label, so meant for single-label tasks such as `sentiment`). The
same backbone with random weights is the reference: the gap is what pretraining added. Ends with
`probe pooled_pretrained=... pooled_random=... embeddings_pretrained=... embeddings_random=...`.
"""
import argparse
import os
import sys

import keras
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data_util_hdf5 as data_util  # noqa: E402
import model  # noqa: E402
import run_directory  # noqa: E402


def encode(path: str, vocab: data_util.Vocabulary, style: str, length: int):
    ids, first_labels = [], []
    for _, line in data_util.read_lines(path):
        text, labels = data_util.parse_label_line(line)
        if labels:
            ids.append(data_util.encode_example(data_util.tokenize(text, style), vocab, length))
            first_labels.append(labels[0])
    return np.array(ids, np.int32), np.array(first_labels)


def pooled(backbone, ids: np.ndarray) -> np.ndarray:
    pooled = [backbone(model.backbone_features(ids[start:start + 256]))["pooled_output"].numpy()
              for start in range(0, len(ids), 256)]
    return np.concatenate(pooled)


def mean_embedding(backbone, ids: np.ndarray) -> np.ndarray:
    table = model.get_token_embedding(backbone).embeddings.numpy()
    real = (ids >= len(data_util.SPECIAL_TOKENS)).astype(np.float32)[..., None]
    return (table[ids] * real).sum(1) / np.maximum(real.sum(1), 1.0)


def probe_accuracy(train_x, train_y, valid_x, valid_y) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    classifier = LogisticRegression(C=0.1, max_iter=3000).fit(scaler.transform(train_x), train_y)
    return float(classifier.score(scaler.transform(valid_x), valid_y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrained_dir", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--valid", required=True)
    parser.add_argument("--sequence_length", type=int, default=64)
    args = parser.parse_args()
    run = run_directory.open_finished(args.pretrained_dir, "pretrain", "--pretrained_dir")
    vocab = data_util.Vocabulary.load(run.verified(run_directory.VOCAB))
    style = run.read_json_object(run_directory.DATA_CONFIG)["tokenize_style"]
    train = encode(args.train, vocab, style, args.sequence_length)
    valid = encode(args.valid, vocab, style, args.sequence_length)
    pretrained, config = model.load_backbone(run.verified(run_directory.CONFIG),
                                             run.verified(run_directory.BACKBONE_WEIGHTS))
    keras.utils.set_random_seed(0)
    random_init = model.build_backbone(config)
    scores = {}
    for name, backbone in (("pretrained", pretrained), ("random", random_init)):
        for kind, features in (("pooled", pooled), ("embeddings", mean_embedding)):
            scores[f"{kind}_{name}"] = probe_accuracy(features(backbone, train[0]), train[1],
                                                      features(backbone, valid[0]), valid[1])
    print("probe " + " ".join(f"{k}={v:.3f}" for k, v in sorted(scores.items())))


if __name__ == "__main__":
    main()
