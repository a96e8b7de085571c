"""Turning (image, prompt, answer) into TheWorld's token sequence, labels and pixel tensors.

The sequence is Gemma 3's chat format with a world block after the image block:

    <bos><start_of_turn>user\\n
    \\n\\n<start_of_image><image_soft_token>*N<end_of_image>\\n\\n
    <start_of_world><world_soft_token>*M<end_of_world>
    {prompt}<end_of_turn>\\n<start_of_turn>model\\n{answer}<end_of_turn>

`<world_soft_token>` is a placeholder, like Gemma's own image soft token: the model writes the
projected world embeddings into those positions. Only answer tokens carry labels.

`ModelSequenceLimit` measures samples the way `InputBuilder.encode` does, from the processor alone
(no weights), so data preparation can count a sample that does not fit `max_seq_length` as
`too_long` instead of the stage failing at the batch that holds it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from theworld_core.data.images import to_rgb  # one conversion for data and for generate()

IGNORE_INDEX = -100
START_OF_WORLD = "<start_of_world>"
END_OF_WORLD = "<end_of_world>"
WORLD_SOFT_TOKEN = "<world_soft_token>"
WORLD_TOKENS = (START_OF_WORLD, END_OF_WORLD, WORLD_SOFT_TOKEN)
END_OF_TURN = "<end_of_turn>"


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T-1) mask of the positions whose next token carries a label: where the loss is computed."""
    return labels[:, 1:] != IGNORE_INDEX


def answer_token_count(labels: torch.Tensor) -> int:
    """Number of labelled (answer) tokens in a batch: the divisor of a summed loss."""
    return int(answer_positions(labels).sum())


class SequenceTooLongError(ValueError):
    """The prompt (with image and world tokens) and answer do not fit `max_seq_length`."""


@dataclass(frozen=True)
class WorldTokenIds:
    start: int
    end: int
    soft: int


class InputBuilder:
    """Builds model inputs with the model's own processor; one instance per model."""

    def __init__(
        self,
        processor,
        token_ids: WorldTokenIds,
        world_tokens: int,
        world_image_size: int,
        enable_world: bool,
        max_seq_length: int,
    ):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.ids = token_ids
        self.world_tokens = world_tokens
        self.world_image_size = world_image_size
        self.enable_world = enable_world
        self.max_seq_length = max_seq_length
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.tokenizer.image_token)
        self._prompt_ids: dict[str, torch.Tensor] = {}
        # Without pan and scan every image gets the same tokens, so a prompt's ids need no pixels;
        # None until checked once against the processor's own output (`_checked_prompt_ids`).
        self._layout_without_pixels: bool | None = (
            None if not getattr(processor.image_processor, "do_pan_and_scan", False) else False
        )

    def _prompt_text(self, prompt: str) -> str:
        world = START_OF_WORLD + WORLD_SOFT_TOKEN * self.world_tokens + END_OF_WORLD if self.enable_world else ""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": world + prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def world_pixels(self, image: Image.Image) -> torch.Tensor:
        """The VAE's view of the image: (3, S, S) in [-1, 1]."""
        size = (self.world_image_size, self.world_image_size)
        array = np.asarray(image.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
        return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0

    def encode(
        self, image: Image.Image, prompt: str, answer: str | None = None, *, vision: bool = True, world: bool = True
    ) -> dict[str, torch.Tensor]:
        """One sample. With `answer`, it is appended (plus `<end_of_turn>`) and alone carries labels.

        `vision` / `world` False: no `pixel_values` / `world_pixel_values` (their features come from
        the feature cache); the tokens are the same, and without `vision` the image processor does
        not run unless the layout depends on the image (pan and scan).
        """
        image = to_rgb(image)
        pixel_values = None
        if vision or not self.layout_without_pixels(prompt):
            # The chat template already emits <bos>: no second one from the processor.
            enc = self.processor(
                text=self._prompt_text(prompt), images=[image], add_special_tokens=False, return_tensors="pt"
            )
            prompt_ids, pixel_values = enc["input_ids"][0], enc["pixel_values"][0]
        else:
            prompt_ids = self.prompt_ids(prompt)
        answer_ids = (
            torch.tensor(self.tokenizer(answer + END_OF_TURN, add_special_tokens=False)["input_ids"], dtype=torch.long)
            if answer is not None
            else torch.zeros(0, dtype=torch.long)
        )
        problem = self.length_problem(len(prompt_ids), len(answer_ids))
        if problem is not None:
            raise SequenceTooLongError(problem)
        input_ids = torch.cat([prompt_ids, answer_ids])
        labels = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer_ids])
        sample = {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": torch.ones_like(input_ids),
            # 1 marks image tokens, which Gemma 3 lets attend to each other bidirectionally.
            "token_type_ids": (input_ids == self.image_token_id).long(),
        }
        if vision:
            sample["pixel_values"] = pixel_values
        if world:
            sample["world_pixel_values"] = self.world_pixels(image)
        return sample

    def prompt_ids(self, prompt: str) -> torch.Tensor:
        """Token ids `encode` puts before the answer (template, image and world tokens, prompt),
        without running the image processor: the image token expanded as the processor expands it
        for an image without pan-and-scan crops (every such image gets the same tokens)."""
        ids = self._prompt_ids.get(prompt)
        if ids is None:
            processor = self.processor
            expanded, _ = processor.get_text_with_replacements(
                [self._prompt_text(prompt)], [processor.replace_image_token({"num_crops": [0]}, 0)]
            )
            ids = torch.tensor(self.tokenizer(expanded[0], add_special_tokens=False)["input_ids"], dtype=torch.long)
            if len(self._prompt_ids) < PROMPT_LENGTH_CACHE:
                self._prompt_ids[prompt] = ids
        return ids

    def layout_without_pixels(self, prompt: str = "Describe this image.") -> bool:
        """Whether `prompt_ids` gives what the processor gives with an image: no pan and scan, and
        checked once against the processor (a processor that expands images otherwise is used as is)."""
        if self._layout_without_pixels is None:
            self._layout_without_pixels = torch.equal(self._processor_prompt_ids(prompt), self.prompt_ids(prompt))
        return self._layout_without_pixels

    def _processor_prompt_ids(self, prompt: str) -> torch.Tensor:
        """The processor's own prompt ids, with a placeholder image."""
        placeholder = Image.new("RGB", (32, 32))
        enc = self.processor(
            text=self._prompt_text(prompt), images=[placeholder], add_special_tokens=False, return_tensors="pt"
        )
        return enc["input_ids"][0]

    def prompt_length(self, prompt: str) -> int:
        """Tokens `encode` puts before the answer, counted without an image where the layout allows."""
        ids = self.prompt_ids(prompt) if self.layout_without_pixels(prompt) else self._processor_prompt_ids(prompt)
        return len(ids)

    def answer_length(self, answer: str | None) -> int:
        """Tokens of the answer as `encode` appends it (with `<end_of_turn>`); 0 for None."""
        if answer is None:
            return 0
        return len(self.tokenizer(answer + END_OF_TURN, add_special_tokens=False)["input_ids"])

    def length_problem(self, prompt_tokens: int, answer_tokens: int) -> str | None:
        """Why a sequence of these parts does not fit `max_seq_length`, or None when it does."""
        length = prompt_tokens + answer_tokens
        if length <= self.max_seq_length:
            return None
        return (
            f"sequence of {length} tokens ({prompt_tokens} prompt incl. image and "
            f"{self.world_tokens if self.enable_world else 0} world tokens, {answer_tokens} answer) is "
            f"{length - self.max_seq_length} over max_seq_length={self.max_seq_length}; "
            "shorten the prompt, lower world_tokens or raise max_seq_length"
        )

    def collate(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Right-pad a list of `encode` outputs into a batch (padding: pad id, mask 0, label -100)."""
        batch = self.collate_tokens(samples)
        batch["pixel_values"] = torch.stack([s["pixel_values"] for s in samples])
        batch["world_pixel_values"] = torch.stack([s["world_pixel_values"] for s in samples])
        return batch

    def collate_tokens(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The token part of `collate` (ids, labels, masks), placeholder counts checked."""
        width = max(len(s["input_ids"]) for s in samples)
        pad_values = {
            "input_ids": self.tokenizer.pad_token_id,
            "labels": IGNORE_INDEX,
            "attention_mask": 0,
            "token_type_ids": 0,
        }
        batch = {}
        for key, pad in pad_values.items():
            rows = [torch.nn.functional.pad(s[key], (0, width - len(s[key])), value=pad) for s in samples]
            batch[key] = torch.stack(rows)
        self.check_placeholders(batch["input_ids"])
        return batch

    def check_placeholders(self, input_ids: torch.Tensor) -> None:
        """Every row holds one image's and one world block's placeholder tokens, as the model writes
        them. Checked here, on the host where the batch is built (in a DataLoader worker), so the
        model's forward never reads a count back from the device."""
        per_image = getattr(self.processor, "image_seq_length", None)
        expected = {
            "image": (self.image_token_id, per_image),
            "world": (self.ids.soft, self.world_tokens if self.enable_world else 0),
        }
        for what, (token_id, wanted) in expected.items():
            if wanted is None:
                continue
            counts = (input_ids == token_id).sum(dim=1)
            wrong = torch.nonzero(counts != wanted).flatten().tolist()
            if wrong:
                row = wrong[0]
                raise ValueError(
                    f"batch row {row} holds {int(counts[row])} {what} placeholder tokens where the model writes "
                    f"{wanted} {what} embeddings; inputs must be built with the model's InputBuilder"
                )


INPUTS_VERSION = 1
"""Bump when the sequence layout (and so any sample's length) changes: part of the data fingerprint."""
PROMPT_LENGTH_CACHE = 4096
"""Distinct prompts whose token ids an `InputBuilder` remembers (most data has one prompt)."""


@dataclass(frozen=True)
class ModelSequenceLimit:
    """A model config's `max_seq_length`, measured as `InputBuilder.encode` measures: the
    `SequenceLimit` that `theworld_core.data.prepare_data(..., sequence_limit=)` takes.

        prepare_data(cfg.data_part(), sequence_limit=ModelSequenceLimit.of(cfg))

    Needs only the model's processor (no weights), loaded on first use once per process; the
    object itself is a few strings and numbers, so it pickles cheaply to DataLoader workers.
    """

    model_name: str
    model_revision: str | None
    world_tokens: int
    enable_world: bool
    max_seq_length: int

    @classmethod
    def of(cls, cfg: Any) -> ModelSequenceLimit:
        """From a `ModelConfig` or a stage config (anything with the model keys)."""
        return cls(cfg.model_name, cfg.model_revision, cfg.world_tokens, cfg.enable_world, cfg.max_seq_length)

    def identity(self) -> dict[str, Any]:
        return {"inputs_version": INPUTS_VERSION, **asdict(self)}

    def problem(self, prompt: str, text: str) -> str | None:
        """None when (image, prompt, text) fits; else the `encode` error, with the caption's length."""
        builder = self.builder()
        problem = builder.length_problem(builder.prompt_length(prompt), builder.answer_length(text))
        return None if problem is None else f"{problem} (caption of {len(text):,} characters)"

    def builder(self) -> InputBuilder:
        """An `InputBuilder` on the model's processor with the world tokens added (cached per process)."""
        builder = _MEASURING_BUILDERS.get(self)
        if builder is None:
            builder = _MEASURING_BUILDERS[self] = self._load_builder()
        return builder

    def _load_builder(self) -> InputBuilder:
        from transformers import AutoProcessor

        from theworld_core.model.base import BaseModelError, hf_token, resolve_model_source

        source = resolve_model_source(self.model_name, "gemma")
        try:
            processor = AutoProcessor.from_pretrained(source, revision=self.model_revision, token=hf_token())
        except Exception as error:  # any loading failure: re-raised naming the key and value
            raise BaseModelError(
                f"model_name: cannot load the processor of {source!r} to measure samples against "
                f"max_seq_length: {type(error).__name__}: {error}"
            ) from error
        tokenizer = processor.tokenizer
        missing = [token for token in WORLD_TOKENS if token not in tokenizer.get_vocab()]
        if missing:  # as TheWorld adds them, so a world block counts as the model counts it
            tokenizer.add_tokens(missing, special_tokens=True)
        ids = WorldTokenIds(
            *(tokenizer.convert_tokens_to_ids(t) for t in (START_OF_WORLD, END_OF_WORLD, WORLD_SOFT_TOKEN))
        )
        return InputBuilder(processor, ids, self.world_tokens, 8, self.enable_world, self.max_seq_length)


_MEASURING_BUILDERS: dict[ModelSequenceLimit, InputBuilder] = {}
"""One measuring builder per limit and process (loading a processor takes a second or two)."""


def prepare_stage_data(cfg: Any):
    """A stage's data (`theworld_core.data.prepare_data`) with the samples that cannot fit the
    model's `max_seq_length` counted as `too_long` bad samples, as the trainer, the evaluation and
    the pipeline's fingerprint all see it. `cfg`: a `StageConfig`."""
    from theworld_core.data import prepare_data

    return prepare_data(cfg.data_part(), sequence_limit=ModelSequenceLimit.of(cfg))
