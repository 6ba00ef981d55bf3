"""Swappable backbones (Transformer, TextCNN), heads and task models. See DESIGN.md's contract."""
from .backbone import (FIRST_WORD_ID, INPUT_NAMES, PAD_ID, WIDTH_MULTIPLE, backbone_features,
                       backbone_inputs, build_backbone, get_token_embedding, pad_to_multiple,
                       trim_padding)
from .config import (BACKBONES, PRESETS, ConfigError, ModelConfig, check_sequence_length,
                     config_from_preset)
from .heads import (NGRAM_BASE, BagOfWordsLogits, MaskedLMHead, MultiLabelHead,
                    NextSentenceHead, ngram_keys, one_hot_gather)
from .io import BackboneMismatchError, load_backbone
from .layers import (AttentionDropout, Embeddings, Pooler, SelfAttention, TextCNNEncoder,
                     TransformerBlock)
from .tasks import (NGRAM_LIMIT, NGRAM_MIN_ROWS, MaskedLMAccuracy, PretrainingModel,
                    build_bag_of_words_classifier, build_classifier, build_pretraining_model,
                    build_scoring_classifier, compile_classifier, compile_pretraining_model,
                    masked_lm_loss, multilabel_loss, ngram_vocabulary, predict_logits,
                    prefetched, set_document_frequencies, set_label_priors)
from .multilabel import (decision_thresholds, f1_scores, mean_loss, per_label_report,
                         predict_labels, predict_probabilities, sigmoid, split_scores,
                         tune_thresholds)
