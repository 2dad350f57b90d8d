"""A tiny randomly initialised BERT saved as a Hugging Face folder (config, weights, tokenizer.json).

Tests export it instead of the 22.6 M-parameter default so a whole export takes seconds. The folder
is loaded through the same `from_pretrained` path a hub id takes, which is how hub loading is tested
without internet.
"""

from __future__ import annotations

from pathlib import Path

WORDS = ("the a of to and in is it that for on with as was he she they we you this stock market shares bank "
         "profit film music award star band election minister party vote government match team cup goal "
         "player win season phone software internet computer game users technology company year new said").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LABELS = ("business", "entertainment", "politics", "sport", "tech")


def write_tokenizer(path: Path) -> int:
    """A WordPiece tokenizer over a tiny vocabulary, saved as tokenizer.json; returns the vocab size."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    chars = sorted(set("".join(WORDS)) | set("0123456789.,!?'-"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(dict.fromkeys(WORDS + chars + [f"##{c}" for c in chars])))}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    tok.save(str(path))
    return len(vocab)


def make_tiny_bert(folder: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """Save a tiny BERT (2 layers, d=32 by default) with its tokenizer into `folder`."""
    import torch
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(folder / "tokenizer.json")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


TINY_TIERS = """
[global]
experts = 4
rank = 8

[tiers.small]
experts_held = 2
top_k = 1
adapted_layers = 1
seq_len = 16
batch_size = 4
lora_rank = 2

[tiers.big]
experts_held = 4
top_k = 2
adapted_layers = 2
seq_len = 32
batch_size = 4
lora_rank = 4
"""


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.tiny_model OUT`: export the tiny model's two tiers to OUT (used by .ci/run)."""
    import argparse
    import tempfile

    from export.artifacts import ExportOptions, export_all
    from export.backbone import load_backbone
    from export.tiers import parse_tiers

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        backbone = load_backbone(str(make_tiny_bert(Path(tmp) / "tiny-bert")))
        export_all(backbone, parse_tiers(TINY_TIERS), ExportOptions(out_dir=args.out, labels=LABELS, probe_steps=1),
                   progress=lambda _: None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


CLASS_WORDS = {
    "business": "stock market shares bank profit company",
    "entertainment": "film music award star band",
    "politics": "election minister party vote government",
    "sport": "match team cup goal player win season",
    "tech": "phone software internet computer game users technology",
}


def write_tiny_dataset(path: Path, rows: int = 60, seed: int = 0, labels: tuple[str, ...] = LABELS) -> Path:
    """A learnable CSV: each text mixes common words with words of its class."""
    import csv
    import random

    rng = random.Random(seed)
    common = "the a of to and in is it that for on with".split()
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(rows):
            label = labels[i % len(labels)]
            words = CLASS_WORDS[label].split()
            text = " ".join(rng.choice(words) if rng.random() < 0.5 else rng.choice(common) for _ in range(10))
            writer.writerow([text, label])
    return path
