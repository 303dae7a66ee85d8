"""Shared test helpers: a tiny, network-free T5-style tokenizer and sample prompts.

``make_t5_tokenizer_json`` trains a SentencePiece-unigram model with the ``tokenizers``
library and lays it out like T5's ``tokenizer.json``: ``<pad>``=0, ``</s>``=1, ``<unk>``=2,
``WhitespaceSplit`` + ``Metaspace`` pre-tokenizer, a ``TemplateProcessing`` post-processor
that appends ``</s>``, a ``Metaspace`` decoder. The folder also gets ``tokenizer_config.json``
and ``special_tokens_map.json`` so ``transformers.T5TokenizerFast.from_pretrained(folder)``
loads it (diffusers pipeline tests use it as ``tokenizer_2``).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers.models import Unigram

#: Sample prompts; the last one is long enough to be truncated at ``max_length=16``.
PROMPTS: list[str] = [
    "a cat",
    "A photo of a red fox sitting in the snow, highly detailed.",
    "A sculptor waving a poster stating 'user'.",
    "two dogs  playing   with a ball on the beach at sunset",
    "",
    "an astronaut riding a horse on the moon, digital art, cinematic lighting, dramatic clouds, "
    "wide angle lens, a small village in the distance with warm lights in every window",
]

_CORPUS = """\
a photo of a cat sitting on a red chair in a sunny room
a dog playing with a ball on the beach at sunset
an astronaut riding a horse on the moon digital art
a sculptor waving a poster stating user
a red fox sitting in the snow highly detailed
two dogs and a man walking in the park under the trees
a small village in the distance with warm lights in every window
cinematic lighting dramatic clouds wide angle lens
a painting of a city at night with neon signs and rain
the quick brown fox jumps over the lazy dog
a bowl of fruit on a wooden table next to a window
a portrait of an old woman with blue eyes and a green scarf
a castle on a hill surrounded by mountains and a river
a robot reading a book in a library full of light
a bird flying over the ocean with waves and rocks below
a bicycle leaning against a yellow wall in the street
a bear eating honey in the forest during autumn
a glass of water on a black background studio photo
a train crossing a bridge in the snow at dawn
a girl holding an umbrella in the rain photo realistic
a rat a cat and a man standing next to each other
text that says hello world written on a white sign
a futuristic car driving through a desert road
an apple a banana and an orange in a basket
a ship sailing on a calm sea under the stars
"""

_SPECIALS = ["<pad>", "</s>", "<unk>"]


def make_t5_tokenizer_json(directory: str | Path, vocab_size: int = 300) -> Path:
    """Write a tiny T5-style ``tokenizer.json`` (+ transformers config files) into ``directory``.

    ``vocab_size`` is an upper bound: the trainer may stop earlier on the small corpus.
    Returns the path of ``tokenizer.json``. No network; builds in well under a second.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIALS,
        unk_token="<unk>",
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation),
        show_progress=False,
    )
    lines = _CORPUS.splitlines()
    corpus = lines + [line.capitalize() for line in lines] + PROMPTS
    tok.train_from_iterator(corpus, trainer=trainer)
    for i, name in enumerate(_SPECIALS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    path = directory / "tokenizer.json"
    tok.save(str(path))
    specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": 512,
        "extra_ids": 0,
        "additional_special_tokens": [],
        "legacy": False,
        **specials,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return path


def make_t5_spiece_model(directory: str | Path, vocab_size: int = 150) -> Path:
    """Write a tiny T5-style SentencePiece ``spiece.model`` (pad=0, eos=1, unk=2, no bos) into ``directory``.

    Needs the ``sentencepiece`` package; returns the model's path.
    """
    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines() + PROMPTS),
        model_prefix=str(directory / "spiece"),
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (directory / "spiece.vocab").unlink(missing_ok=True)
    return directory / "spiece.model"
