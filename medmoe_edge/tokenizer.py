"""Tokenizer loading (from the checkpoint directory, §4.2.2) and small GPT-2-style BPE tokenizers.

Loading goes through `transformers.AutoTokenizer` with `trust_remote_code=False`:
the StableLM base's original Arcade100k tokenizer is remote code (tiktoken), which we
never execute from an untrusted checkpoint; newer revisions ship an equivalent
`tokenizer.json` that loads without it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError


@dataclass(frozen=True)
class SpecialTokens:
    """Special tokens as the released tokenizers set them (§4.2 Tokenizers)."""

    eos: str = "<|endoftext|>"  # also bos; the prompt stop string sep2
    unk: str = "<|extra_0|>"  # added by Med-MoE training as unk, and pad = unk

    @property
    def all(self) -> list[str]:
        return [self.eos, self.unk]


PHI_SPECIALS = SpecialTokens()
STABLELM_SPECIALS = SpecialTokens(unk="<|reg0|>")


class Tokenizer:
    """The few operations inference needs: encode without specials, decode, EOS id, length."""

    def __init__(self, hf_tokenizer) -> None:
        self._tok = hf_tokenizer
        eos = hf_tokenizer.eos_token_id
        if eos is None:
            raise CheckpointError("the tokenizer defines no eos_token; Med-MoE stops on <|endoftext|>: add it to tokenizer_config.json")
        self.eos_id: int = int(eos)
        self.pad_id: int = int(hf_tokenizer.pad_token_id) if hf_tokenizer.pad_token_id is not None else self.eos_id

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer saved in a checkpoint directory.

        Raises:
            CheckpointError: no tokenizer files, or one that needs remote code.
        """
        path = Path(path)
        if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
            raise CheckpointError(f"{path} has no tokenizer files (tokenizer.json or vocab.json + merges.txt): copy the base model's tokenizer into the checkpoint directory")
        import warnings

        import transformers  # heavy import, only when loading
        from transformers import AutoTokenizer

        try:
            # AutoTokenizer peeks at config.json and warns that moe_llava_* is not a transformers
            # model type; that is expected here, so keep the user's terminal clean.
            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, padding_side="right")
        except ValueError as e:
            if "trust_remote_code" in str(e) or "remote code" in str(e):
                raise CheckpointError(
                    f"the tokenizer in {path} needs remote code, which medmoe-edge never runs: "
                    "save a tokenizer.json for it (newer stablelm-2-1_6b revisions ship one) and retry"
                ) from None
            raise CheckpointError(f"cannot load the tokenizer in {path}: {str(e).splitlines()[0]}") from None
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot load the tokenizer in {path}: {str(e).splitlines()[0]}") from None
        finally:
            transformers.logging.set_verbosity(verbosity)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS (neither Med-MoE tokenizer adds a BOS, §4.2)."""
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` with special tokens skipped, as the official decode (§5.4)."""
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def __len__(self) -> int:
        return len(self._tok)

    @property
    def hf(self):
        """The underlying transformers tokenizer (for exporters that need vocab/merges)."""
        return self._tok


def train_bpe(corpus: Iterable[str], vocab_size: int, specials: SpecialTokens, out_dir: str | Path) -> None:
    """Train a GPT-2-style byte-level BPE tokenizer on `corpus` and save it in HF format.

    Byte-level BPE with GPT-2's pre-tokeniser is what the Phi variant uses and what
    llama.cpp's `gpt2` tokenizer model reproduces, so GGUF exports can carry it.
    Deterministic for a given corpus and vocab size.
    """
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials.all,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    raw.train_from_iterator(list(corpus), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=specials.eos,
        eos_token=specials.eos,
        unk_token=specials.unk,
        pad_token=specials.unk,  # pad = unk, as Med-MoE training sets it
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tok.save_pretrained(str(out_dir))
    # transformers 5 records its internal backend class name; the generic fast class
    # loads in transformers 4.x and 5.x alike.
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def pad_vocab(out_dir: str | Path, vocab_size: int) -> None:
    """Give the tokenizer saved in `out_dir` `vocab_size` tokens by appending unreachable ones
    (`<|unusedN|>`: no merge produces them, so text tokenises as before).

    A random checkpoint's small tokenizer makes the loader truncate the embedding and lm_head to
    its length (spec §4.2.6); padded, the checkpoint keeps its rows as a released one, whose
    tokenizer covers its vocabulary, does: for real-dimension proxies.
    """
    path = Path(out_dir) / "tokenizer.json"
    j = json.loads(path.read_text())
    vocab = j["model"]["vocab"]
    nxt = max([*vocab.values(), *(t["id"] for t in j.get("added_tokens", []))]) + 1
    vocab.update({f"<|unused{i}|>": i for i in range(nxt, vocab_size)})
    path.write_text(json.dumps(j, ensure_ascii=False))


def default_corpus() -> list[str]:
    """A small built-in corpus for the tokenizers of random checkpoints: the prompt
    template plus radiology/pathology VQA phrasing, so prompts tokenise compactly."""
    from .prompt import SYSTEM

    words = (
        "yes no left right upper lower lobe lung lungs heart liver kidney kidneys spleen brain skull bone bones rib ribs "
        "chest abdomen pelvis CT MRI X-ray x-ray pathology ultrasound fundus scan image slice axial coronal sagittal "
        "lesion mass nodule tumor tumour cyst fracture effusion pneumonia pneumothorax edema hemorrhage infarct normal "
        "abnormal present absent small large single multiple one two three four five contrast enhanced T1 T2 FLAIR "
        "tissue cells nuclei stained H&E biopsy gland glands inflammation necrosis carcinoma benign malignant "
        "what where which is are there does this show organ modality plane side size how many the a an of in on"
    ).split()
    questions = [
        "Is there a lesion in the left lung?",
        "What modality is this image?",
        "Which organ is shown in this image?",
        "Is the mass on the left or the right side?",
        "How many nodules are present?",
        "Does this image show a fracture?",
        "What is the abnormality in the brain?",
        "Are there cells with large nuclei?",
    ]
    lines = [f"{SYSTEM} USER: \n{q} ASSISTANT: {a}<|endoftext|>" for q in questions for a in ("yes", "no", "CT", "MRI", "left", "right")]
    lines += [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    return lines
