"""Shared training pieces: the original's prediction rule, F1, the learning-rate schedule."""
import numpy as np
import pytest

import data_util_hdf5 as du
import train_util as tu


def test_prediction_rule_takes_every_label_over_half_or_the_top_one():
    probs = np.array([[0.9, 0.6, 0.1], [0.2, 0.4, 0.3], [0.5, 0.1, 0.0]])
    assert tu.predict_labels(probs).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_f1_is_the_mean_of_micro_and_macro_over_all_train_labels():
    gold = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    probs = np.array([[0.9, 0.1, 0.1], [0.8, 0.1, 0.2], [0.7, 0.9, 0.1]])
    scores = tu.f1_scores(gold, probs)
    # label 0: tp 2 fp 1 fn 0 -> 0.8; label 1: tp 1 fn 1 -> 2/3; label 2 never seen -> 0
    assert scores["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert scores["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 0.0) / 3)
    assert scores["f1"] == pytest.approx((scores["micro_f1"] + scores["macro_f1"]) / 2)


def test_per_label_report_names_every_label():
    gold = np.array([[1, 0], [0, 1]])
    report = tu.per_label_report(gold, np.array([[0.9, 0.1], [0.9, 0.2]]), ["a", "b"])
    assert [r["label"] for r in report] == ["a", "b"]
    assert report[0]["precision"] == pytest.approx(0.5) and report[1]["recall"] == 0.0


def test_schedule_warms_up_then_decays_and_round_trips():
    schedule = tu.WarmupExponentialDecay(1e-3, decay_steps=100, decay_rate=0.5, warmup_steps=10)
    assert float(schedule(0)) == pytest.approx(1e-4)
    assert float(schedule(9)) == pytest.approx(1e-3)
    assert float(schedule(100)) == pytest.approx(5e-4)
    again = tu.WarmupExponentialDecay.from_config(schedule.get_config())
    assert float(again(250)) == pytest.approx(float(schedule(250)))


def test_summary_line_is_grep_able(capsys):
    line = tu.summary_line("fine_tune", test_f1=0.83456, epochs=2, ckpt_dir="runs/ft")
    assert line == "fine_tune test_f1=0.8346 epochs=2 ckpt_dir=runs/ft"
    assert capsys.readouterr().out.strip() == line


def test_head_file_copies_the_first_lines(tmp_path):
    source = tmp_path / "a.txt"
    source.write_text("1\n2\n3\n", encoding="utf-8")
    target = tu.head_file(str(source), 2, str(tmp_path / "sub" / "b.txt"))
    assert open(target, encoding="utf-8").read() == "1\n2\n"


def test_head_file_keeps_the_encoding_and_names_a_bad_line(tmp_path):
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("北京 __label__a\n上海 __label__b\n广州 __label__c\n".encode("gb18030"))
    target = tu.head_file(str(gbk), 2, str(tmp_path / "head.txt"), "gb18030")
    assert [t for _, t in du.read_lines(target, "gb18030")] == ["北京 __label__a", "上海 __label__b"]
    with pytest.raises(du.DataError, match=r"gbk.txt:1: cannot decode as utf-8.*--encoding gb18030"):
        tu.head_file(str(gbk), 2, str(tmp_path / "head2.txt"))
