"""Tiny random stand-ins for Gemma 3 and the Cosmos VAE, built offline and cached on disk.

No weights can be downloaded here, yet the model code must go through exactly the same loaders as
for `google/gemma-3-4b-it` and `nvidia/Cosmos-Predict2-2B-Video2World`. So we build two small,
randomly initialised checkpoints with the real classes and `save_pretrained` them into folders
that look like the hub repos:

    <out>/tiny_spec.json                      spec hash + version: marks a finished build
    <out>/gemma-3-tiny/                       Gemma3ForConditionalGeneration + tokenizer + Gemma3Processor
    <out>/cosmos-predict2-tiny/model_index.json
    <out>/cosmos-predict2-tiny/vae/           AutoencoderKLWan (the Wan 2.1 VAE Cosmos Predict 2 uses)

Both are written like the real checkpoints: bf16 safetensors, and a Gemma config that declares
`"dtype": "bfloat16"` (transformers 5 then loads it in bf16 unless a dtype is passed; diffusers has
no config key for it and upcasts the VAE to fp32 unless `torch_dtype` is passed), so every test
runs the loading path real users run.

The build is deterministic (fixed seeds), cached (a folder holding a finished build of the same
spec is reused as is) and atomic (built in a temporary sibling and renamed into place, so a
crashed or concurrent build never leaves a half-written folder that looks finished).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Bump when the layout or content of a build changes in a way the spec dict below does not capture.
SPEC_VERSION = 3  # 3: weights written in bf16 (2 and older wrote fp32)
SPEC_FILE = "tiny_spec.json"
GEMMA_SUBDIR = "gemma-3-tiny"
COSMOS_SUBDIR = "cosmos-predict2-tiny"
SEED = 1234
# The dtype the weights are written in, as `google/gemma-3-4b-it` declares (`torch_dtype: bfloat16`).
CHECKPOINT_DTYPE = "bfloat16"

# Gemma 3's special tokens. The first five keep the real ids (pad 0, eos 1, bos 2, unk 3, mask 4);
# the others get the next ids (the real ones sit far up a 262k vocabulary). `<start_of_world>` /
# `<end_of_world>` are deliberately absent: the model code adds them, as it does for the real one.
PAD, EOS, BOS, UNK, MASK = "<pad>", "<eos>", "<bos>", "<unk>", "<mask>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
BOI, EOI, IMAGE_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, BOS, UNK, MASK, START_OF_TURN, END_OF_TURN, BOI, EOI, IMAGE_TOKEN)
BYTE_TOKENS: tuple[str, ...] = tuple(f"<0x{i:02X}>" for i in range(256))  # byte fallback, as in Gemma's vocab

# Target tokenizer size (specials + 256 bytes + learned pieces); fewer if the corpus runs out of merges.
TOKENIZER_VOCAB_SIZE = 1000
# Gemma pads its embedding table past the tokenizer (262208 rows for 262145 tokens, a multiple of 64),
# so new tokens such as <start_of_world> fit without a resize; the tiny one does the same (1000 -> 1024).
EMBEDDING_MULTIPLE = 64

# Equivalent to Gemma 3's own chat template: `<bos>` first, the system message folded into the first
# user turn, `assistant` renamed `model`, an image rendered as `<start_of_image>` (which
# Gemma3Processor expands to boi + image tokens + eoi), optional generation prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- set role = 'model' -%}"
    "{%- else -%}"
    "{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    "{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)

# Words the synthetic captions and prompts use: they should be single pieces or nearly so.
_CORE_WORDS = (
    "a an the red green blue yellow purple orange white black gray grey brown pink circle square "
    "triangle cross star shape shapes at top bottom left right center centre middle corner of image "
    "describe this picture photo shows show what is are there in and or with small large big tiny "
    "on background foreground near next to above below one two three four several color colour "
    "object objects the a an it its user model system assistant"
).split()

# Generic English so that the tokenizer also splits ordinary text into sensible pieces.
_GENERIC_TEXT = """\
The world is full of simple things that we rarely stop to look at carefully.
A model that can see and talk should describe what it sees in plain words.
Please describe this picture in one short sentence.
What is in the image? There is a small red circle near the top left corner.
The background is white and a large blue square sits in the middle.
Answer the question about the image using only the information you can see.
Training a language model takes data, time, patience and a good deal of careful engineering.
Every experiment starts with a question, a hypothesis and a plan to measure the result.
We tried the same run twice and obtained exactly the same numbers, which is reassuring.
The weather today is cold and windy, but tomorrow should be warm and sunny again.
She opened the window, looked at the garden and counted seven birds on the fence.
He wrote a letter to his friend, asking about the train that leaves at nine in the morning.
Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42 and 100 appear in many documents.
Questions end with a question mark; statements end with a full stop. Lists use commas!
The quick brown fox jumps over the lazy dog, and the dog does not seem to care at all.
Water boils at one hundred degrees, while ice melts when the temperature rises above zero.
Scientists observe, predict, test and revise their theories about how the universe works.
A video is a sequence of frames; a world model predicts the next frames from the past ones.
The camera moved slowly to the right, following the ball as it rolled across the table.
Robots need to understand space, objects, motion, physics and the consequences of actions.
Children learn by playing, building towers of blocks and watching them fall down again.
The library was quiet except for the sound of pages turning and a clock ticking softly.
Cities grow around rivers, roads, markets, schools, hospitals, parks and railway stations.
Music, painting, writing and dance are different ways of telling stories about people.
If you have any doubt, read the instructions again before you continue with the work.
This sentence, that sentence and another sentence together make a very small paragraph.
Good software is tested, documented, reviewed and easy to change when requirements change.
The evaluation reports accuracy, loss, perplexity and the number of tokens per second.
"""

_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
_SHAPES = ("circle", "square", "triangle", "cross")
_PLACES = (
    "at the top left",
    "at the top right",
    "at the bottom left",
    "at the bottom right",
    "in the center",
    "in the middle",
    "at the top",
    "at the bottom",
    "on the left",
    "on the right",
)
_PROMPTS = ("Describe this image.", "What is in this picture?", "What does the image show?", "Describe the picture.")


def _training_corpus() -> list[str]:
    """The built-in corpus: generic text plus caption-like sentences from a seeded generator."""
    rng = random.Random(SEED)
    lines = _GENERIC_TEXT.splitlines()
    lines.append(" ".join(_CORE_WORDS))
    for _ in range(400):
        size = rng.choice(("small", "large", "tiny", "big"))
        color, shape, place = rng.choice(_COLORS), rng.choice(_SHAPES), rng.choice(_PLACES)
        background = rng.choice(_COLORS)
        # Shaped like a chat turn pair (the roles are words in Gemma's template, not special tokens).
        lines.append(
            f"user\n{rng.choice(_PROMPTS)}\nmodel\n"
            f"The image shows a {size} {color} {shape} {place} of the image on a {background} background."
        )
        lines.append(f"A {color} {shape} {place}, and an {rng.choice(_COLORS)} {rng.choice(_SHAPES)} in the middle.")
    return lines


# Everything that determines the build's content; its hash names a build (see `tiny_spec.json`).
TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,  # Gemma 3 4B uses head_dim here too
    "sliding_window": 64,
    # One local and one global layer, so both attention kinds of Gemma 3 are exercised.
    "layer_types": ["sliding_attention", "full_attention"],
    "max_position_embeddings": 4096,
}
VISION_CONFIG: dict[str, Any] = {
    "model_type": "siglip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
    "vision_use_head": False,  # as in Gemma 3: patch embeddings go to the projector, no pooling head
}
MM_TOKENS_PER_IMAGE = 4  # perfect square; (image_size / patch_size) = 4 divisible by its root 2
VAE_CONFIG: dict[str, Any] = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}


def _spec() -> dict[str, Any]:
    return {
        "version": SPEC_VERSION,
        "seed": SEED,
        "special_tokens": list(SPECIAL_TOKENS),
        "tokenizer_vocab_size": TOKENIZER_VOCAB_SIZE,
        "embedding_multiple": EMBEDDING_MULTIPLE,
        "corpus": _training_corpus(),
        "chat_template": CHAT_TEMPLATE,
        "text_config": TEXT_CONFIG,
        "vision_config": VISION_CONFIG,
        "mm_tokens_per_image": MM_TOKENS_PER_IMAGE,
        "vae_config": VAE_CONFIG,
        "checkpoint_dtype": CHECKPOINT_DTYPE,
        "layout": [GEMMA_SUBDIR, COSMOS_SUBDIR],
    }


@functools.cache
def spec_hash() -> str:
    """Hash of the build spec: a cached folder is reused only if its recorded hash matches."""
    blob = json.dumps(_spec(), sort_keys=True, ensure_ascii=True).encode()
    return hashlib.sha256(blob).hexdigest()


# Files a build must have whatever the library versions (the spec file also lists every file
# written, with its size, and all of those are checked too).
_REQUIRED_FILES: tuple[str, ...] = (
    f"{GEMMA_SUBDIR}/config.json",
    f"{GEMMA_SUBDIR}/tokenizer.json",
    f"{COSMOS_SUBDIR}/model_index.json",
    f"{COSMOS_SUBDIR}/vae/config.json",
)
# Entries a folder may hold for us to replace it wholesale (anything else: refuse, not ours).
_OWN_ENTRIES = frozenset({SPEC_FILE, GEMMA_SUBDIR, COSMOS_SUBDIR})


@dataclass(frozen=True)
class TinyModelPaths:
    """Where a tiny build lives; each path goes where a hub id would (`model_name`, `cosmos_model_name`)."""

    gemma: Path
    """Loadable with Gemma3ForConditionalGeneration / AutoProcessor / AutoTokenizer `.from_pretrained`."""
    cosmos: Path
    """Root with `model_index.json`; `AutoencoderKLWan.from_pretrained(cosmos, subfolder="vae")`."""

    def as_dict(self) -> dict[str, str]:
        return {"gemma": str(self.gemma), "cosmos": str(self.cosmos)}


def default_tiny_dir() -> Path:
    """`$THEWORLD_HOME/tiny`, with THEWORLD_HOME defaulting to `~/.cache/theworld`."""
    home = os.environ.get("THEWORLD_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "theworld")
    return Path(home).expanduser() / "tiny"


def _paths(root: Path) -> TinyModelPaths:
    return TinyModelPaths(gemma=root / GEMMA_SUBDIR, cosmos=root / COSMOS_SUBDIR)


def is_complete(root: Path) -> bool:
    """True if `root` holds a finished build of the current spec (spec file matches, files present)."""
    try:
        recorded = json.loads((root / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return False
    if (
        not isinstance(recorded, dict)
        or recorded.get("version") != SPEC_VERSION
        or recorded.get("spec_hash") != spec_hash()
    ):
        return False
    files = recorded.get("files")
    if not isinstance(files, dict) or not all(rel in files for rel in _REQUIRED_FILES):
        return False
    # Every file written must still be there with its size (catches deletions and truncations).
    try:
        return all((root / rel).stat().st_size == size for rel, size in files.items())
    except OSError:
        return False


def ensure_tiny_models(out_dir: Path | None = None) -> TinyModelPaths:
    """Return the tiny models under `out_dir` (default `default_tiny_dir()`), building them if needed.

    A finished build of the same spec is reused untouched. Otherwise the models are built in a
    temporary sibling folder and renamed into place; an existing folder that holds only our
    entries (a stale or older build) is replaced, one with anything else is refused.
    """
    root = Path(out_dir if out_dir is not None else default_tiny_dir()).expanduser().absolute()
    if is_complete(root):  # fast path, no lock
        return _paths(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _lock(root.parent / f".{root.name}.lock"):
        # Another process may have finished while we waited for the lock.
        if is_complete(root):
            return _paths(root)
        _check_replaceable(root)
        _remove_leftovers(root)
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _build(tmp)
            _install(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not is_complete(root):  # should not happen; better an error than half a model
        raise RuntimeError(f"tiny model build in {root} did not complete")
    return _paths(root)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Inter-process lock so concurrent callers build once; a no-op where fcntl is missing.

    Correctness does not depend on it (the rename is atomic and a finished target wins); it only
    saves a second build and guards the move-aside of a stale folder.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _check_replaceable(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder; cannot build tiny models there")
    if root.is_dir():
        foreign = sorted(p.name for p in root.iterdir() if p.name not in _OWN_ENTRIES)
        if foreign:
            raise FileExistsError(
                f"{root} holds no finished tiny-model build and contains other files ({', '.join(foreign[:5])}); "
                "refusing to replace it: pass an empty or dedicated folder"
            )


def _remove_leftovers(root: Path) -> None:
    """Delete temporary/stale siblings of crashed builds (we hold the lock, so none is live)."""
    for pattern in (f".{root.name}.tmp-*", f".{root.name}.stale-*"):
        for leftover in root.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _install(tmp: Path, root: Path) -> None:
    """Atomically put the finished build `tmp` at `root`, moving a stale `root` aside first.

    If a finished build appeared at `root` meanwhile, it wins and `tmp` is left to be discarded.
    """
    if is_complete(root):
        return
    stale: Path | None = None
    if root.is_dir() and any(root.iterdir()):
        stale = root.parent / f".{root.name}.stale-{uuid.uuid4().hex[:8]}"
        os.replace(root, stale)
    try:
        # rename(2) replaces a missing or empty directory atomically.
        os.replace(tmp, root)
    except OSError:
        # Target appeared and is non-empty: someone without the lock finished first. Keep theirs
        # if it is complete, otherwise this is a real error.
        if not is_complete(root):
            raise
    finally:
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The build itself. Heavy imports live here so that importing this module stays cheap.
# --------------------------------------------------------------------------------------------


def _build(target: Path) -> None:
    """Write a complete build into the (new) folder `target`; the spec file is written last."""
    import torch

    target.mkdir(parents=True)
    # fork_rng: seed for determinism without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        gemma_info = _build_gemma(target / GEMMA_SUBDIR)
        vae_info = _build_cosmos(target / COSMOS_SUBDIR)
    import diffusers
    import tokenizers
    import transformers

    written = sorted(p for p in target.rglob("*") if p.is_file())
    record = {
        "version": SPEC_VERSION,
        "spec_hash": spec_hash(),
        "files": {p.relative_to(target).as_posix(): p.stat().st_size for p in written},
        "gemma": gemma_info,
        "cosmos": vae_info,
        "built_with": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "diffusers": diffusers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
    (target / SPEC_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def build_tokenizer() -> Any:
    """Train the tiny BPE (byte fallback) on the built-in corpus and wrap it in `GemmaTokenizer`."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import GemmaTokenizer

    # Train with Gemma's normalisation (spaces become "▁", no prefix space) and split before each
    # "▁" so that pieces never span words; GemmaTokenizer itself applies merges to the whole
    # string, which gives the same pieces for merges learned this way.
    trainer_tok = Tokenizer(BPE(unk_token=UNK, byte_fallback=True))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    n_fixed = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB_SIZE - n_fixed, show_progress=False)
    trainer_tok.train_from_iterator(_training_corpus(), trainer)
    learned = json.loads(trainer_tok.to_str())["model"]

    # Final id layout: specials, then the 256 byte tokens, then learned pieces in training order.
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *BYTE_TOKENS, *sorted(learned["vocab"], key=learned["vocab"].get)):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]

    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        mask_token=MASK,
        # v5: any `*_token` keyword becomes a named special token; Gemma3Processor reads these three.
        boi_token=BOI,
        eoi_token=EOI,
        image_token=IMAGE_TOKEN,
        extra_special_tokens=[START_OF_TURN, END_OF_TURN],
        add_bos_token=True,  # must be explicit (Gemma adds <bos>; the chat template emits it itself)
        add_eos_token=False,
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    # The specials must keep the ids laid out above (the config's token indices depend on them).
    for token in SPECIAL_TOKENS:
        got = tokenizer.convert_tokens_to_ids(token)
        if got != vocab[token]:
            raise RuntimeError(f"tokenizer put {token} at id {got}, expected {vocab[token]}")
    return tokenizer


def _build_gemma(folder: Path) -> dict[str, Any]:
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, GenerationConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = build_tokenizer()
    ids = {
        name: tokenizer.convert_tokens_to_ids(tok)
        for name, tok in (
            ("pad", PAD),
            ("eos", EOS),
            ("bos", BOS),
            ("unk", UNK),
            ("start_of_turn", START_OF_TURN),
            ("end_of_turn", END_OF_TURN),
            ("boi", BOI),
            ("eoi", EOI),
            ("image", IMAGE_TOKEN),
        )
    }
    vocab_size = -(-len(tokenizer) // EMBEDDING_MULTIPLE) * EMBEDDING_MULTIPLE

    config = Gemma3Config(
        text_config={
            **TEXT_CONFIG,
            "vocab_size": vocab_size,
            "pad_token_id": ids["pad"],
            "bos_token_id": ids["bos"],
            "eos_token_id": ids["eos"],
        },
        vision_config=dict(VISION_CONFIG),
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=ids["boi"],
        eoi_token_index=ids["eoi"],
        image_token_index=ids["image"],
        pad_token_id=ids["pad"],
        bos_token_id=ids["bos"],
        eos_token_id=[ids["eos"], ids["end_of_turn"]],  # as gemma-3-*-it: a turn end stops generation
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model = Gemma3ForConditionalGeneration(config).eval()  # initialised in float32 (torch's default dtype)
    # transformers initialises the multi-modal projection to zeros (the pretrained checkpoint
    # overwrites it): left so, every image would vanish and the vision tower get no gradient.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    # Like the -it checkpoints: stop at <eos> or <end_of_turn>; greedy so tests are reproducible.
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], pad_token_id=ids["pad"], eos_token_id=[ids["eos"], ids["end_of_turn"]]
    )

    side = VISION_CONFIG["image_size"]
    image_processor = Gemma3ImageProcessorPil(
        size={"height": side, "width": side},
        image_mean=[0.5, 0.5, 0.5],  # Gemma 3's preprocessing maps pixels to [-1, 1]
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=MM_TOKENS_PER_IMAGE,
    )

    # Written in bf16 like the hub checkpoint: save_pretrained then declares `"dtype": "bfloat16"`.
    model.to(getattr(torch, CHECKPOINT_DTYPE))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)  # also writes the tokenizer files
    n_params = sum(p.numel() for p in model.parameters())
    return {"token_ids": ids, "tokenizer_size": len(tokenizer), "vocab_size": vocab_size, "parameters": n_params}


def _build_cosmos(folder: Path) -> dict[str, Any]:
    import diffusers
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(SEED + 1)
    vae = AutoencoderKLWan(**VAE_CONFIG).eval()  # initialised in float32
    # Written in bf16. Parameters are cast one by one: diffusers' `ModelMixin.to(dtype)` warns about
    # modules to keep in fp32, and this VAE has none (it has no floating buffers either).
    with torch.no_grad():
        for param in vae.parameters():
            param.data = param.data.to(getattr(torch, CHECKPOINT_DTYPE))
    vae.save_pretrained(folder / "vae")
    # Like the hub repo's root, but only the VAE is present (the project never loads the pipeline).
    model_index = {
        "_class_name": "Cosmos2VideoToWorldPipeline",
        "_diffusers_version": diffusers.__version__,
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    return {"parameters": sum(p.numel() for p in vae.parameters())}


__all__ = [
    "CHECKPOINT_DTYPE",
    "TinyModelPaths",
    "build_tokenizer",
    "default_tiny_dir",
    "ensure_tiny_models",
    "is_complete",
    "spec_hash",
]
