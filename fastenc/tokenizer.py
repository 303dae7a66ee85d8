"""T5 SentencePiece (unigram) tokenizer wrapper with per-target padding and truncation.

The result of :meth:`Tokenizer.__call__` equals what diffusers gets from
``T5TokenizerFast(prompts, padding="max_length", max_length=L, truncation=True)``:
ids end with ``</s>`` (the tokenizer.json post-processor appends it, and truncation keeps it),
padding uses the tokenizer's pad id (0 for T5), the attention mask is 1 for tokens
including ``</s>`` and 0 for padding.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import processors

from .config import max_length_for, read_json_object
from .errors import ConfigError
from .fileio import atomic_write, check_utf8_path, looks_local, not_a_file
from .inputs import prompt_list

logger = logging.getLogger("fastenc")

#: Subfolders of a diffusers pipeline that may hold the T5 tokenizer (Flux, SD3, PixArt), in search order.
PIPELINE_SUBFOLDERS = ("tokenizer_2", "tokenizer_3", "tokenizer")
PADDING_MODES = ("max_length", "longest")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class TokenBatch:
    """Token ids and mask for a batch of prompts.

    ``input_ids``/``attention_mask``: ``torch.long`` ``[B, L]``; ``num_truncated`` prompts
    (at indices ``truncated``) were longer than ``max_length`` and lost their tail.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    num_truncated: int = 0
    truncated: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> "TokenBatch":
        """Copy of the batch with both tensors on ``device``."""
        return TokenBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.num_truncated, list(self.truncated)
        )


def _special_token(config: dict[str, Any], name: str, default: str) -> str:
    value = config.get(name, default)
    if isinstance(value, dict):  # AddedToken serialisation: {"content": "<pad>", ...}
        value = value.get("content", default)
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        logger.warning("ignoring tokenizer_config.json %s=%r (not a string); using %r", name, value, default)
        return default
    return value


class Tokenizer:
    """A T5 SentencePiece tokenizer (a ``tokenizers.Tokenizer``) with diffusers-style batching.

    Thread-safe: the wrapped tokenizer's padding/truncation state is never mutated per call.
    """

    def __init__(self, tokenizer: _HFTokenizer, *, pad_token: str = "<pad>", eos_token: str = "</s>") -> None:
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        pad_id, eos_id = tokenizer.token_to_id(pad_token), tokenizer.token_to_id(eos_token)
        if pad_id is None or eos_id is None:
            missing = pad_token if pad_id is None else eos_token
            raise ConfigError(f"tokenizer has no {missing!r} token; is it a T5 SentencePiece tokenizer?")
        self._pad_id, self._eos_id = pad_id, eos_id
        if self._tok.post_processor is None:  # T5 always appends </s>; transformers adds the same template
            logger.info("tokenizer.json has no post-processor; appending %r like T5TokenizerFast", eos_token)
            self._tok.post_processor = processors.TemplateProcessing(
                single=["$A", eos_token], pair=["$A", eos_token, "$B", eos_token], special_tokens=[(eos_token, eos_id)]
            )
        self._num_special = self._tok.post_processor.num_special_tokens_to_add(False)
        self._fingerprint: str | None = None

    # ---- loading ------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load a ``tokenizer.json``; special tokens come from a ``tokenizer_config.json`` beside it, if any."""
        path = Path(path)
        _check_regular(path)
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses for bad JSON
            raise ConfigError(f"{path}: not a valid tokenizer.json ({exc})") from None
        config: dict[str, Any] = {}
        cfg_path = path.parent / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                config = read_json_object(cfg_path)
            except ConfigError as exc:  # special tokens then default to T5's <pad> and </s>
                logger.warning("ignoring unreadable tokenizer config (%s)", exc)
        pad, eos = _special_token(config, "pad_token", "<pad>"), _special_token(config, "eos_token", "</s>")
        for key, token in (("pad_token", pad), ("eos_token", eos)):
            if key in config and tok.token_to_id(token) is None:  # the config named it: say which file and key
                raise ConfigError(f"{cfg_path}: {key} {token!r} is not a token of {path} (a tokenizer_config.json "
                                  "from another tokenizer?)")
        try:
            return cls(tok, pad_token=pad, eos_token=eos)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    @classmethod
    def from_spiece(cls, path: str | Path) -> "Tokenizer":
        """Convert a SentencePiece ``spiece.model`` via transformers' T5TokenizerFast (needs sentencepiece).
        An empty or unparsable file is one ConfigError naming it."""
        path = Path(path)
        _check_regular(path)
        try:
            from transformers import T5TokenizerFast
            import sentencepiece
        except ImportError as exc:
            raise ConfigError(
                f"{path.parent} has spiece.model but no tokenizer.json; converting it needs transformers and "
                f"sentencepiece ({exc}). Install them (pip install 'fastenc[diffusers]') "
                "or pass a folder with tokenizer.json"
            ) from None
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        if size == 0:
            raise ConfigError(f"{path}: an empty file (0 bytes), not a SentencePiece model")
        try:  # parse it first: the conversion's own failures on a damaged model do not name the file
            sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception:
            raise ConfigError(f"{path}: not a SentencePiece model (sentencepiece cannot parse it)") from None
        try:  # from_pretrained converts in transformers 4 and 5 (5's __init__ ignores vocab_file)
            if path.name == "spiece.model":
                hf = T5TokenizerFast.from_pretrained(str(path.parent), local_files_only=True)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    shutil.copyfile(path, Path(tmp) / "spiece.model")
                    hf = T5TokenizerFast.from_pretrained(tmp, local_files_only=True)
        except Exception as exc:
            raise ConfigError(f"{path}: could not convert spiece.model ({exc})") from None
        try:
            return cls(hf.backend_tokenizer, pad_token=str(hf.pad_token), eos_token=str(hf.eos_token))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    @classmethod
    def from_pretrained(cls, source: str | Path, *, subfolder: str | None = None) -> "Tokenizer":
        """Load the T5 tokenizer from a folder, a diffusers pipeline folder, a file, or a hub id.

        Local folders are searched for ``tokenizer.json`` (or ``spiece.model``) in ``subfolder`` if
        given, else in the folder itself, then ``tokenizer_2/``, ``tokenizer_3/``, ``tokenizer/``;
        a ``tokenizer.json`` whose model is not Unigram (e.g. SD3's CLIP tokenizers) is skipped.
        A path that does not exist but looks like ``owner/name`` is fetched from the hub.
        """
        if not isinstance(source, (str, os.PathLike)) or not os.fspath(source).strip():
            raise ConfigError(f"tokenizer must be a folder, file or hub id (str or os.PathLike), got {source!r:.60}")
        path = Path(source).expanduser()
        if path.exists():
            check_utf8_path(path)
        if path.is_file():
            return cls.from_spiece(path) if path.suffix == ".model" else cls.from_file(path)
        if path.is_dir():
            names = [subfolder] if subfolder is not None else ["", *PIPELINE_SUBFOLDERS]
            skipped: list[str] = []
            for name in names:
                folder = path / name if name else path
                for file in ("tokenizer.json", "spiece.model"):  # a FIFO, a folder, /dev/zero: said, not skipped
                    _check_regular(folder / file)
                if (folder / "tokenizer.json").is_file():
                    kind = _model_type(folder / "tokenizer.json")
                    if kind == "Unigram":
                        return cls.from_file(folder / "tokenizer.json")
                    skipped.append(f"{folder / 'tokenizer.json'} ({kind} model, not T5 SentencePiece)")
                elif (folder / "spiece.model").is_file():
                    return cls.from_spiece(folder / "spiece.model")
            looked = ", ".join(str(path / n) if n else str(path) for n in names)
            extra = f"; skipped {'; '.join(skipped)}" if skipped else ""
            raise ConfigError(f"no T5 tokenizer.json or spiece.model found in {looked}{extra}")
        text = str(source)
        if os.path.lexists(path):  # a FIFO, a device, a socket, a link to nothing or to /dev/zero
            _check_regular(path)
        if not isinstance(source, str) or looks_local(text):  # ./x, /x, ~/x, a link: never a hub id
            raise ConfigError(f"tokenizer path {text!r} does not exist")
        if not _HUB_ID.match(text) or ".." in text or "--" in text:
            raise ConfigError(f"tokenizer path {text!r} does not exist (and is not a Hugging Face hub id)")
        return cls.from_file(_download(text, subfolder))

    # ---- encoding -----------------------------------------------------------------------

    def __call__(
        self,
        prompts: str | Sequence[str],
        *,
        target: str = "flux-dev",
        max_length: int | None = None,
        padding: str = "max_length",
        warn: bool = True,
    ) -> TokenBatch:
        """Tokenize ``prompts`` to ``[B, L]`` ids and mask, ``L`` = ``max_length`` or the target's length.

        ``padding="max_length"`` pads to ``L``; ``"longest"`` pads to the longest prompt (at most ``L``).
        Prompts longer than ``L`` tokens are cut to ``L - 1`` tokens plus ``</s>``, with a warning
        unless ``warn=False`` (the count is in the result either way).
        """
        if isinstance(prompts, Iterator):  # a generator of prompts, taken whole as before
            prompts = list(prompts)
        prompts = prompt_list(prompts)  # a str or a sequence of valid str, else one InputError
        length = max_length_for(target) if max_length is None else max_length
        if not isinstance(length, int) or isinstance(length, bool) or length < max(1, self._num_special):
            raise ConfigError(f"max_length must be an integer >= {max(1, self._num_special)}, got {length!r}")
        if padding not in PADDING_MODES:
            raise ConfigError(f"padding must be one of {PADDING_MODES}, got {padding!r}")

        keep = length - self._num_special
        rows: list[list[int]] = []
        truncated: list[int] = []
        for i, enc in enumerate(self._tok.encode_batch(prompts, add_special_tokens=False)):
            if len(enc.ids) > keep:
                truncated.append(i)
                enc.truncate(keep)
            rows.append(self._tok.post_process(enc).ids)
        if truncated and warn:
            logger.warning(
                "%d of %d prompts were longer than %d tokens and were truncated", len(truncated), len(prompts), length
            )
        width = length if padding == "max_length" else max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return TokenBatch(input_ids, attention_mask, len(truncated), truncated)

    def decode(
        self, ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]], *, skip_special_tokens: bool = True
    ) -> str | list[str]:
        """Ids back to text: one string for a 1-D sequence, a list of strings for ``[B, L]``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = list(ids)
        if ids and isinstance(ids[0], (list, tuple)):
            return self._tok.decode_batch([list(map(int, r)) for r in ids], skip_special_tokens=skip_special_tokens)
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- properties / saving ------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (32100 for T5; the model's table is 32128)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_token_id(self) -> int:
        return self._pad_id

    @property
    def eos_token_id(self) -> int:
        return self._eos_id

    @property
    def fingerprint(self) -> str:
        """Content identity: sha256 of the serialised tokenizer plus its pad and eos ids (the embedding
        cache keys on it, so another tokenizer never gets this one's cached embeddings). Computed once:
        do not change :attr:`backend` after encoding with it."""
        if self._fingerprint is None:
            text = f"{self._tok.to_str()}|pad={self._pad_id}|eos={self._eos_id}"
            self._fingerprint = hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
        return self._fingerprint

    @property
    def backend(self) -> _HFTokenizer:
        """The wrapped ``tokenizers.Tokenizer`` (do not enable padding/truncation on it)."""
        return self._tok

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/tokenizer.json`` atomically (temp file, then ``os.replace``); returns its path."""
        text = self._tok.to_str(pretty=True)
        return atomic_write(Path(directory) / "tokenizer.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _model_type(path: Path) -> str:
    """The ``model.type`` of a tokenizer.json ("Unigram" for T5), or "unreadable"."""
    try:
        model = read_json_object(path, max_bytes=1 << 30).get("model", {})
    except ConfigError:
        return "unreadable"
    return str(model.get("type", "unknown")) if isinstance(model, dict) else "unknown"


def _download(repo_id: str, subfolder: str | None) -> Path:
    """Fetch a Unigram ``tokenizer.json`` from hub repo ``repo_id`` (root, then pipeline subfolders)."""
    from . import hub  # offline: fails at once, naming the `hf download` command

    hint = (
        "pass a local folder that contains tokenizer.json instead (e.g. a Flux pipeline's tokenizer_2 folder, "
        f"or the folder where Tokenizer.save() wrote one): {hub.tokenizer_hint(repo_id, subfolder)}"
    )
    names = [subfolder] if subfolder is not None else [None, *PIPELINE_SUBFOLDERS]
    failure = "tokenizer.json not found in the repo or its tokenizer_2/, tokenizer_3/, tokenizer/ subfolders"
    for name in names:
        try:
            file = hub.fetch_file(repo_id, "tokenizer.json", subfolder=name)
        except hub.HubUnavailable as exc:  # offline and not cached (another location may be), unknown repo, ...
            failure = str(exc)
            continue
        if file is None:  # the repo has no such file: try the next location
            continue
        if _model_type(file) == "Unigram":
            return file
        logger.info("skipping %s: not a T5 SentencePiece tokenizer", file)
    raise ConfigError(
        f"could not download a T5 tokenizer.json from Hugging Face hub repo {repo_id!r} ({failure}); {hint}"
    )


def _check_regular(path: Path) -> None:
    """A tokenizer file that is there but is no regular file (a FIFO would block the read forever, a link
    to /dev/zero would never end): one ConfigError naming it, instead of being skipped or hanging."""
    kind = not_a_file(path)
    if kind is not None:
        raise ConfigError(f"{path}: is {kind}, not a regular file")
