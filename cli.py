"""The scripts' edge: their shared flags, the checks on them, the settings they become, and the
one-line errors a user sees. Only the top-level scripts import this module (and the speed
benchmarks, to run under the scripts' TensorFlow runtime); the library modules
below it (classifier_task, pretrain_task, train_util, data_util_hdf5, run_directory, model/)
take plain values, so a notebook or a test calls them without absl.

Import it before anything that loads TensorFlow: it keeps TensorFlow's C++ start-up lines (CUDA
stubs, CPU features, oneDNN) and its per-epoch INFO lines off the terminal unless
--verbosity=1 or higher asks for them, and it makes TensorFlow pool its CPU memory (below).
"""
from __future__ import annotations

import errno
import os
import sys
import tempfile
from typing import Callable


def _verbosity_asked(argv: list[str]) -> int:
    """absl's --verbosity / -v from the raw command line (flags are parsed after imports)."""
    for position, arg in enumerate(argv):
        for prefix in ("--verbosity", "-v"):
            if arg == prefix and position + 1 < len(argv):
                value = argv[position + 1]
            elif arg.startswith(prefix + "="):
                value = arg.split("=", 1)[1]
            else:
                continue
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _load_tensorflow_quietly() -> None:
    """Import TensorFlow and find its devices with file descriptor 2 sent to a scratch file: its
    C++ logging writes there before any Python setting can reach it. On failure the lines are
    replayed, since they then explain the error."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    saved = os.dup(2)
    with tempfile.TemporaryFile() as scratch:
        os.dup2(scratch.fileno(), 2)
        try:
            import tensorflow as tf
            tf.config.list_physical_devices()
        except BaseException:
            os.dup2(saved, 2)
            scratch.seek(0)
            sys.stderr.buffer.write(scratch.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# TensorFlow's CPU allocator hands every tensor to malloc, which gives a large one (an attention
# score tensor is 82 MB at batch 64, length 200) back to the system when it is freed, so each step
# page-faults all of its memory in again: where the kernel does not back it with huge pages, a
# third to nearly half of a training process's time went to the kernel. TensorFlow's BFC pool
# keeps freed memory for the next step (masked LM 1.65x; benchmarks/compare_allocator.py). Read by
# TensorFlow when it makes its CPU allocator, so it is set before anything runs; a user's own
# TF_CPU_ALLOCATOR_USE_BFC=false wins.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
if "tensorflow" not in sys.modules and _verbosity_asked(sys.argv) < 1:
    _load_tensorflow_quietly()

# Modules that load TensorFlow come after the quiet load above.
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

import classifier_task  # noqa: E402
import data_util_hdf5 as data_util  # noqa: E402
import model  # noqa: E402
import run_directory  # noqa: E402
import train_util  # noqa: E402
from data.prepare import ensure_sample_data  # noqa: E402

FLAGS = flags.FLAGS
if _verbosity_asked(sys.argv) < 1:
    # tf.distribute logs every collective it sets up at INFO: dozens of lines a worker
    tf.get_logger().setLevel("WARNING")


# --------------------------------------------------------------------------- shared flags
def define_common_flags(learning_rate: float, weight_decay: float, test_mode_help: str,
                        num_epochs: int | None = 10,
                        num_epochs_help: str = "Passes over the training data.",
                        learning_rate_help: str = "Peak Adam learning rate.") -> None:
    """Flags every training script has, with the same meaning everywhere."""
    flags.DEFINE_boolean("test_mode", False, test_mode_help)
    flags.DEFINE_string("data_path", None, "Directory of the sample data; built there on first "
                        "use when it is missing. Default: data/ next to these scripts.")
    flags.DEFINE_string("cache_dir", None, "Where tokenized HDF5 caches go. Default: cache/ next "
                        "to the input text file.")
    flags.DEFINE_enum("tokenize_style", None, list(data_util.TOKENIZE_STYLES), "How text becomes "
                      "tokens: 'space' for already segmented text (the sample data and the "
                      "original's format), 'word' for jieba segmentation of raw Chinese, 'char' "
                      "for one token per character. Default: space; fine-tuning takes the "
                      "pretraining run's and refuses a different one.")
    flags.DEFINE_float("learning_rate", learning_rate, learning_rate_help)
    flags.DEFINE_integer("warmup_steps", None, "Steps of linear learning-rate warm-up from 0; 0 "
                         "turns it off. Default: a tenth of the run's steps, at most one "
                         "epoch, for a classifier (a fresh head and post-LN blocks both start "
                         "badly with a full step; a longer warm-up spends epochs that early "
                         "stopping counts), a tenth of an epoch when pretraining a "
                         "Transformer, else 0.")
    flags.DEFINE_integer("decay_steps", None, "Give it for the original's exponential decay, lr * "
                         "decay_rate^(step / decay_steps). Default: after warm-up the rate falls "
                         "linearly to 0 at the run's last step (--num_epochs x steps an epoch), "
                         "so the schedule fits the data size.")
    flags.DEFINE_float("decay_rate", 0.95, "Exponential decay factor; used with --decay_steps.")
    flags.DEFINE_float("weight_decay", weight_decay, "Decoupled weight decay (AdamW) standing in "
                       "for the original's L2 term; 0 turns it off.")
    flags.DEFINE_float("dropout_keep_prob", 0.9, "1 - dropout rate, as in the original.")
    flags.DEFINE_integer("batch_size", 64, "Examples per step, over all replicas.")
    flags.DEFINE_integer("num_epochs", num_epochs, num_epochs_help, lower_bound=1)
    flags.DEFINE_integer("process_num", None, "Tokenizing processes. Default: the number of cores "
                         "for --tokenize_style=word, 1 for char and space (splitting is cheaper "
                         "than shipping lines to workers).")
    flags.DEFINE_string("encoding", "utf-8", "Text encoding of the input files, e.g. gb18030 for "
                        "GBK files.")
    flags.DEFINE_enum("distribution_strategy", "one_device", list(train_util.STRATEGIES),
                      "tf.distribute strategy to build and train under (one_device: none, "
                      "TensorFlow's own placement on the first GPU or the CPU; mirrored: all "
                      "local GPUs; multi_worker_mirrored: TF_CONFIG cluster; tpu).")
    flags.DEFINE_boolean("jit_compile", False, "Compile the train step with XLA. Off by "
                         "default: on 2-core CPUs it ran 0.3x to 1.0x the speed without it "
                         "(AVX2: benchmarks/results/speed_zen3.md; AVX-512: "
                         "benchmarks/results/speed.md); worth trying on a GPU.")
    flags.DEFINE_enum("mixed_precision", "off", list(train_util.PRECISIONS), "'bfloat16': layers "
                      "compute in bfloat16, weights, logits and losses stay float32 (Keras' "
                      "mixed_bfloat16 policy). Off by default, checked on one benchmark row per "
                      "backbone only: on a 2-core AVX512_BF16 CPU it trained the TextCNN "
                      "1.20-1.23x and the Transformer 1.27-1.37x faster (two runs, "
                      "benchmarks/results/speed.md). Worth trying there and on TPUs and Ampere "
                      "or later GPUs; on a CPU without bfloat16 instructions (AVX2 only) it ran "
                      "0.23-0.87x as fast (benchmarks/results/speed_zen3.md), and the scripts "
                      "warn. Weight files are float32 either way.")
    flags.DEFINE_integer("seed", 42, "Random seed for splits, initialisation, shuffling, masking.")
    flags.DEFINE_boolean("overwrite", False, "Replace what the run directory holds: a finished "
                         "run, or an unfinished one made with other data or settings. Without "
                         "it such a directory is refused, and rerunning an interrupted command "
                         "resumes it. A test-mode run may replace an earlier finished test-mode "
                         "run.")


def define_model_flags(default_backbone: str = "textcnn") -> None:
    """Architecture flags shared by the scripts that build a backbone from nothing."""
    flags.DEFINE_enum("backbone", default_backbone, list(model.BACKBONES),
                      "Which backbone: the original's TextCNN or a Transformer encoder.")
    flags.DEFINE_enum("preset", "small", list(model.PRESETS), "Model size preset (the "
                      "original's tiny 64/8, small 128/16, big 512/64: d_model/d_k; 8 heads, 6 "
                      "layers); the flags below override single values.")
    flags.DEFINE_integer("d_model", None, "Hidden size. Default: from --preset.")
    flags.DEFINE_integer("num_layer", None, "Transformer blocks. Default: from --preset.")
    flags.DEFINE_integer("num_header", None, "Attention heads. Default: from --preset.")
    flags.DEFINE_integer("d_k", None, "Key/query size per head. Default: from --preset.")
    flags.DEFINE_integer("d_v", None, "Value size per head. Default: from --preset.")
    flags.DEFINE_integer("max_position", 512, "Rows of the position table: the longest sequence "
                         "any later step (fine-tuning, prediction) may use.")
    flags.DEFINE_integer("vocab_size", 30000, "Vocabulary size including the 5 special tokens; "
                         "the most frequent tokens of the corpus are kept.")


def validate_common_flags() -> None:
    """Refuse, in one line each, the values of the shared flags that cannot work; called before
    any file is read or written."""
    check_flag_values([
        ("batch_size", FLAGS.batch_size >= 1, "at least 1"),
        ("learning_rate", FLAGS.learning_rate > 0, "above 0"),
        ("dropout_keep_prob", 0 < FLAGS.dropout_keep_prob <= 1, "in (0, 1]"),
        ("warmup_steps", (FLAGS.warmup_steps or 0) >= 0, "0 or more"),
        ("decay_steps", FLAGS.decay_steps is None or FLAGS.decay_steps >= 1, "at least 1"),
        ("decay_rate", 0 < FLAGS.decay_rate <= 1, "in (0, 1]"),
        ("weight_decay", FLAGS.weight_decay >= 0, "0 or more"),
        ("process_num", FLAGS.process_num is None or FLAGS.process_num >= 1, "at least 1")])
    try:
        data_util.check_encoding(FLAGS.encoding)
    except data_util.DataError as error:
        raise train_util.UsageError(str(error)) from None
    if FLAGS.cache_dir:
        check_writable_directory(FLAGS.cache_dir, "--cache_dir")


def check_flag_values(checks: list[tuple[str, bool, str]]) -> None:
    """`checks`: (flag name, whether its value is fine, what it must be)."""
    for name, fine, wanted in checks:
        if not fine:
            raise train_util.UsageError(f"--{name}={FLAGS[name].value} must be {wanted}")


def check_writable_directory(path: str, flag: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise train_util.UsageError(f"{flag}={path} is a file; give a directory")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(os.path.abspath(probe))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise train_util.UsageError(f"{flag}={path} is not writable; choose another directory")


def dropout_rate() -> float:
    """The original's keep probability turned into the rate Keras layers take."""
    return 1.0 - FLAGS.dropout_keep_prob


def run_dir_flag(name: str) -> str:
    """A run-directory flag's value. In test mode its default gains a test_ prefix (runs/lm ->
    runs/test_lm), so a quick trial never touches the model a real run left there."""
    value = FLAGS[name].value
    if FLAGS.test_mode and not FLAGS[name].present:
        head, tail = os.path.split(os.path.normpath(value))
        value = os.path.join(head, f"test_{tail}")
    return value


# Flags that change where things go or how fast they run, not what a run computes: a run may
# resume with other values of these.
RESUME_NEUTRAL_FLAGS = {"ckpt_dir", "ckpt_dir_save", "overwrite", "process_num", "cache_dir",
                        "data_path", "training_data_file", "valid_data_file", "test_data_file",
                        "mask_lm_source_file", "pretrained_dir", "jit_compile",
                        "distribution_strategy"}
FOREIGN_FLAG_MODULES = ("absl", "tensorflow", "keras")


def run_fingerprint(files: dict[str, str], **extra) -> dict:
    """What a run's results depend on: the sha256 of each input file, every flag of this
    project's modules and scripts (but RESUME_NEUTRAL_FLAGS), and `extra`. A run directory
    resumes only under the same fingerprint."""
    values = {flag.name: flag.value for module, defined in FLAGS.flags_by_module_dict().items()
              if not module.startswith(FOREIGN_FLAG_MODULES) for flag in defined
              if flag.name not in RESUME_NEUTRAL_FLAGS}
    return {"files": {name: data_util.file_fingerprint(path) for name, path in files.items()},
            **values, **extra}


# A classifier's default number of epochs gives it at least this many steps: a labelled set of
# 1,000 lines is 16 steps an epoch, and ten such epochs barely move a fresh head.
MIN_CLASSIFIER_STEPS = 1000
CLASSIFIER_EPOCHS_RANGE = (10, 100)


def epochs_to_run(test_mode_default: int, steps_per_epoch: int | None = None) -> int:
    """--num_epochs; in test mode a short default unless it is given; when the flag has no
    default (the classifiers), enough epochs for MIN_CLASSIFIER_STEPS steps, within
    CLASSIFIER_EPOCHS_RANGE."""
    if FLAGS.test_mode and not FLAGS["num_epochs"].present:
        return test_mode_default
    if FLAGS.num_epochs:
        return FLAGS.num_epochs
    return planned_classifier_epochs(steps_per_epoch or 1)


def planned_classifier_epochs(steps_per_epoch: int) -> int:
    """Enough epochs for MIN_CLASSIFIER_STEPS steps, within CLASSIFIER_EPOCHS_RANGE: what a
    classifier plans when --num_epochs is not given."""
    low, high = CLASSIFIER_EPOCHS_RANGE
    return int(np.clip(-(-MIN_CLASSIFIER_STEPS // max(steps_per_epoch, 1)), low, high))


def config_from_flags(vocab_size: int, preset: str) -> model.ModelConfig:
    """ModelConfig from --preset with the single-value flags laid over it."""
    return model.config_from_preset(
        preset, backbone=FLAGS.backbone, vocab_size=vocab_size, d_model=FLAGS.d_model,
        num_layer=FLAGS.num_layer, num_header=FLAGS.num_header, d_k=FLAGS.d_k, d_v=FLAGS.d_v,
        dropout=dropout_rate(), max_position=FLAGS.max_position)


def start_run() -> tuple[train_util.Timer, tf.distribute.Strategy]:
    """What every training script does first: start the clock, seed everything, set the
    --mixed_precision policy, pick the --distribution_strategy and say how many replicas it
    trains on."""
    timer = train_util.Timer()
    keras.utils.set_random_seed(FLAGS.seed)
    policy = train_util.set_precision(FLAGS.mixed_precision)
    # the strategy first: a multi-worker one must configure TensorFlow before anything lists
    # its devices
    strategy = train_util.get_distribution_strategy(FLAGS.distribution_strategy)
    on_accelerator = bool(tf.config.list_logical_devices("GPU")) or \
        FLAGS.distribution_strategy == "tpu"
    warning = train_util.slow_precision_warning(FLAGS.mixed_precision, train_util.cpu_flags(),
                                                on_accelerator)
    if warning:
        print(warning, file=sys.stderr)
    print(f"distribution: {FLAGS.distribution_strategy}, "
          f"num_replicas_in_sync={strategy.num_replicas_in_sync}, dtype policy: {policy}")
    return timer, strategy


def open_training_run(strategy: tf.distribute.Strategy, flag_name: str, kind: str,
                      fingerprint: dict) -> run_directory.Run:
    """The run directory named by --`flag_name`, locked and started or resumed by the chief;
    under several workers, each other worker gets a scratch run (run_directory.open_for_worker)
    so that exactly one set of artefacts exists."""
    path = run_dir_flag(flag_name)
    if not train_util.is_chief(strategy):
        return run_directory.open_for_worker(path, kind, fingerprint, FLAGS.overwrite)
    run, _ = run_directory.open_for_training(path, kind, fingerprint, FLAGS.overwrite,
                                             f"--{flag_name}", test_run=FLAGS.test_mode)
    return run


def worker_cache_dir(run: run_directory.Run, strategy: tf.distribute.Strategy) -> str | None:
    """None for the chief, which caches at --cache_dir (else beside the input file); a worker
    that is not the chief caches in its scratch run instead (only the chief writes where the
    user looks)."""
    return None if train_util.is_chief(strategy) else run.file("cache")


# ----------------------------------------------------------------------- classifier flags
TEST_MODE_LINES = {"train": 2000, "valid": 400, "test": 400}


def define_classifier_flags(default_ckpt_dir: str, learning_rate_help: str) -> None:
    """Flags common to train_bert_fine_tuning.py and train_transform.py; each script says in
    `learning_rate_help` what the default rate (ClassifierSettings', 1e-3) rests on."""
    define_common_flags(classifier_task.ClassifierSettings.learning_rate, 0.0,
                        "Use a small slice of each file, the tiny "
                        "preset (from scratch) and two epochs, to try an idea quickly.",
                        num_epochs=None, num_epochs_help="Passes over the training data, at "
                        "most. Default: enough for 1,000 steps, within 10 to 100 epochs (a "
                        "small labelled set needs many passes); early stopping ends most "
                        "runs sooner.",
                        learning_rate_help=learning_rate_help)
    flags.DEFINE_string("task", "entities", "Sample task used when the data files are not given: "
                        "'entities' (multi-label, People's Daily paragraphs, 7 labels), "
                        "'mentions' (5-paragraph documents, 241 place/org labels with a long "
                        "tail) or 'sentiment' (reviews).")
    flags.DEFINE_string("training_data_file", None, "Labelled training file, one example a line: "
                        "'token1 token2 __label__a __label__b'. Default: the sample --task's.")
    flags.DEFINE_string("valid_data_file", None, "Labelled validation file (picks the best epoch).")
    flags.DEFINE_string("test_data_file", None, "Labelled test file (the final report).")
    flags.DEFINE_string("ckpt_dir_save", default_ckpt_dir, "Run directory for the classifier: "
                        "weights, config, vocabulary, labels, reports, logs. predict.py reads it. "
                        "Test mode writes to test_<name> beside it unless the flag is given.")
    flags.DEFINE_integer("sequence_length", None, "Tokens per example including [CLS]; longer "
                         "text is cut. Default: long enough that 95% of the training examples "
                         "are not cut, at most the backbone's max_position (the original's fixed "
                         "200 cut 30% of the many-label sample task's text). Batches are cut to "
                         "their longest row, so short texts never pay for a long limit.")
    flags.DEFINE_boolean("bag_of_words", True, "Add to the head a linear model over the text's "
                         "TF-IDF vector (the vocabulary's words, idf from the training split), "
                         "trained with the network: the pooled output has d_model numbers for "
                         "all labels, a linear model reads every word, and on the many-label "
                         "sample task TF-IDF + logistic regression beat the network alone. Its "
                         "vocabulary x labels weights take three times their size with the "
                         "optimiser's two slots: 72 MB for 30,000 words and 200 labels.")
    flags.DEFINE_float("bag_of_words_learning_rate", None, "Peak rate of the bag-of-words "
                       "model, which learns by SGD with momentum 0.9 (Adam lets it memorise "
                       "documents by their rare words) on the same warm-up and decay. Default: "
                       "10, 20 or 40, whichever lets the linear model alone score best on the "
                       "validation split after 3 epochs (a trial of seconds to a minute): its "
                       "features are L2-normalised, so long documents need a faster rate (the "
                       "many-label sample task: 20 or 40, by seed) than short texts (the "
                       "reviews: 10).",
                       lower_bound=0.0)
    flags.DEFINE_integer("bag_of_words_ngrams", None, "Longest n-gram the bag-of-words model "
                         "counts besides single tokens: 2 adds pairs of neighbouring tokens, 3 "
                         f"triples too; those in at least {model.NGRAM_MIN_ROWS} training "
                         f"examples, the {model.NGRAM_LIMIT:,} most widespread at most. Default: "
                         "3 with --tokenize_style=char, else 1. On 1,000 raw reviews read as "
                         "characters, TF-IDF + LR scored 0.770 with single characters and 0.794 "
                         "with 1- to 3-grams; with jieba words, bigrams gave +0.006 on the "
                         "reviews and -0.015 to -0.031 on the many-label sample task (TF-IDF + "
                         "LR, benchmarks/results/raw_reviews_char_probe.md).",
                         lower_bound=1, upper_bound=3)
    flags.DEFINE_float("weight_averaging", None, "Score, keep and predict with a moving average "
                       "of the weights (Polyak averaging: the optimizer's exponential moving "
                       "average, swapped in for each epoch's validation) over about this many "
                       "epochs of steps; 0 uses the weights as they are. Default: "
                       f"{classifier_task.DEFAULT_AVERAGING_EPOCHS:g} when an epoch has at least "
                       f"{classifier_task.AVERAGING_MIN_STEPS} steps (about "
                       f"{classifier_task.AVERAGING_MIN_STEPS * 64:,} examples at batch 64), "
                       "else 0. On the 13,888 sample reviews 0.5 lifted the pretrained "
                       "Transformer by 0.018 "
                       "F1 (its validation F1 peaks at epoch 2 and swings) and the TextCNN by "
                       "0.006, on the 15,189 entity paragraphs the TextCNN by 0.005; on "
                       "1,000-line sets, learnt in two epochs, the average lags (-0.002 to "
                       "-0.004; 3 seeds each, benchmarks/results/weight_averaging_probe.md).",
                       lower_bound=0.0)
    flags.DEFINE_integer("early_stopping_patience", 3, "Stop when validation F1 has not improved "
                         "for this many epochs (the best epoch's weights are kept, as always); "
                         "0 runs every --num_epochs.", lower_bound=0)
    flags.DEFINE_enum("decision_rule", "tuned", list(classifier_task.DECISION_RULES), "How "
                      "probabilities become labels. 'tuned': per-label thresholds chosen on the "
                      "validation split (saved as thresholds.json, used by the test report and "
                      "predict.py; rare labels, which macro-F1 weighs like frequent ones, rarely "
                      "reach 0.5). 'half': the original's rule, every label with p >= 0.5, else "
                      "the top one.")


def validate_classifier_flags() -> None:
    """The classifier flags' values that cannot work, refused in one line before any file is
    touched."""
    validate_common_flags()
    check_flag_values([("sequence_length", FLAGS.sequence_length is None
                        or FLAGS.sequence_length >= 2,
                        "at least 2 ([CLS] and one token)")])


def classifier_settings(cache: str | None = None) -> classifier_task.ClassifierSettings:
    """The classifier flags as the plain settings classifier_task takes (`cache`: the cache
    directory, when it is not --cache_dir's)."""
    return classifier_task.ClassifierSettings(
        batch_size=FLAGS.batch_size, sequence_length=FLAGS.sequence_length,
        dropout=dropout_rate(), learning_rate=FLAGS.learning_rate,
        warmup_steps=FLAGS.warmup_steps, decay_steps=FLAGS.decay_steps,
        decay_rate=FLAGS.decay_rate, weight_decay=FLAGS.weight_decay,
        bag_of_words=FLAGS.bag_of_words,
        bag_of_words_learning_rate=FLAGS.bag_of_words_learning_rate,
        bag_of_words_ngrams=FLAGS.bag_of_words_ngrams,
        jit_compile=FLAGS.jit_compile, weight_averaging=FLAGS.weight_averaging,
        early_stopping_patience=FLAGS.early_stopping_patience,
        decision_rule=FLAGS.decision_rule, seed=FLAGS.seed, encoding=FLAGS.encoding,
        cache_dir=cache or FLAGS.cache_dir, process_num=FLAGS.process_num)


def classifier_data_files() -> dict[str, str]:
    """The train/valid/test files from the flags (or the sample task), each checked readable."""
    given = {"train": FLAGS.training_data_file, "valid": FLAGS.valid_data_file,
             "test": FLAGS.test_data_file}
    if not given["train"]:
        sample = ensure_sample_data(FLAGS.data_path)
        if FLAGS.task not in sample or FLAGS.task == "pretrain":
            raise train_util.UsageError(f"--task={FLAGS.task!r} is not a sample task; use "
                                        "entities, mentions or sentiment")
        given = {split: given[split] or path for split, path in sample[FLAGS.task].items()}
    files = {split: path for split, path in given.items() if path}
    if "valid" not in files:
        raise train_util.UsageError("--valid_data_file is needed with --training_data_file: it "
                                    "picks the best epoch (hold out about a tenth of your "
                                    "labelled lines for it)")
    for split, path in files.items():
        data_util.check_readable(path, f"the {split} data file")
    return files


def open_classifier_run(strategy: tf.distribute.Strategy, files: dict[str, str],
                        **fingerprint_extra) -> tuple[run_directory.Run, dict[str, str]]:
    """Lock --ckpt_dir_save and start, resume or refuse (see run_directory). Returns the run and
    the files to read: in test mode a small slice of each, copied into the run directory."""
    run = open_training_run(strategy, "ckpt_dir_save", "classifier",
                            run_fingerprint(files, **fingerprint_extra))
    if FLAGS.test_mode:
        files = {split: data_util.copy_first_lines(
                     path, TEST_MODE_LINES[split],
                     os.path.join(run.file(run_directory.TEST_DATA), f"{split}.txt"),
                     FLAGS.encoding)
                 for split, path in files.items()}
    return run, files


# ------------------------------------------------------------------------------- errors
def guard(main: Callable) -> Callable:
    """Wrap a script's main so that a user mistake (bad data, config or flag) ends in one line."""
    user_errors = (data_util.DataError, model.ConfigError, model.BackboneMismatchError,
                   train_util.UsageError, run_directory.RunError)

    def guarded(argv):
        try:
            return main(argv)
        except data_util.DiskFullError as error:
            # straight out: a normal shutdown would free the failed write's HDF5 objects, which
            # can crash the interpreter after the message
            run_directory.release_all()
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(2)
        except user_errors as error:
            fail(str(error))
        except KeyboardInterrupt:
            print("\ninterrupted: rerun the same command to resume after the last complete "
                  "epoch", file=sys.stderr)
            sys.exit(130)
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
                raise
            where = f"{error.filename}: " if error.filename else ""
            fail(f"{where}{error.strerror or error}; free disk space or fix the permissions, "
                 "then rerun the same command (an interrupted run resumes)")
    return guarded


def fail(message: str) -> None:
    """Stop a script with one clear line instead of a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
