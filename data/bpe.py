"""A byte-level BPE tokenizer trained on a corpus, with <pad> <unk> <s> </s> as ids 0..3: the tiny teachers'
tokenizer (teachers/tiny.py) and a student's own tokenizer trained on the captions (data/student_tokenizer.py)."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]


def make_bpe_tokenizer(corpus: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus`, with <pad> <unk> <s> </s> as ids 0..3.

    Byte-level means every string encodes (no <unk> in practice) and decodes back exactly.
    It adds no special tokens by itself; the language teacher adds bos/eos explicitly.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
