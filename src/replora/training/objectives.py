"""What a run trains for (one small interface, Objective): a score head (ScoreHead: classification and
multiple choice, text or images) or the text itself (Generative: sft); and the batches they read."""
from __future__ import annotations

import logging

import torch
from torch import nn

from . import generative
from .data import TaskData
from .distributed import is_sharded
from .images import open_image
from .pretrained import head_name, load_causal_lm, load_model
from .settings import TrainSettings
from .vision_models import load_image_classifier

log = logging.getLogger("replora.training")


class Collator:
    """Tokenizes a list of examples; multiple choice pads every question to the batch's most choices."""

    def __init__(self, tokenizer, kind: str, max_length: int):
        self.tokenizer, self.kind, self.max_length = tokenizer, kind, max_length

    def __call__(self, examples: list[dict]) -> dict:
        labels = torch.tensor([e["label"] for e in examples])
        options = dict(padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        if self.kind == "classification":
            batch = self.tokenizer([e["text"] for e in examples], **options)
            return {**batch, "labels": labels}
        width = max(len(e["choices"]) for e in examples)
        questions, answers, mask = [], [], torch.zeros(len(examples), width, dtype=torch.bool)
        for i, e in enumerate(examples):
            for j in range(width):
                questions.append(e["text"])
                answers.append(e["choices"][j] if j < len(e["choices"]) else "")
                mask[i, j] = j < len(e["choices"])
        batch = self.tokenizer(questions, answers, **options)
        batch = {k: v.view(len(examples), width, -1) for k, v in batch.items()}
        return {**batch, "labels": labels, "choice_mask": mask}


class ImageCollator:
    """Decodes a list of image examples to RGB and makes pixel_values as the model's processor says."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, examples: list[dict]) -> dict:
        pixels = self.processor(images=[open_image(e) for e in examples], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": torch.tensor([e["label"] for e in examples])}


def forward_logits(model, batch: dict) -> torch.Tensor:
    """Class logits (classification) or one score per choice, masked past each question's choices."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "choice_mask")}
    if "choice_mask" not in batch:
        return model(**inputs).logits
    b, c = batch["choice_mask"].shape
    scores = model(**{k: v.view(b * c, -1) for k, v in inputs.items()}).logits.view(b, c)
    return scores.masked_fill(~batch["choice_mask"], torch.finfo(scores.dtype).min)


def make_loader(examples, collate, batch_size: int, seed: int | None):
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(examples, batch_size=batch_size, shuffle=seed is not None,
                                       generator=generator, collate_fn=collate)


def evaluate(model, loader, accelerator) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            predictions = forward_logits(model, batch).argmax(-1)
            predictions, labels = accelerator.gather_for_metrics((predictions, batch["labels"]))
            correct += (predictions == labels).sum().item()
            total += labels.numel()
    model.train()
    return correct / max(total, 1)


class Objective:
    """What a run trains for: the loop (loop.train) uses nothing else of it. A subclass loads the model (and
    whatever turns examples into batches) in __init__, and says how to batch, score and test."""

    score: str  # the validation metric that picks the best adapter and drives early stopping ...
    higher_is_better: bool  # ... and which way is better

    def __init__(self, s: TrainSettings, task: TaskData):
        self.s, self.task = s, task
        self.model: nn.Module
        self.head: str | None = None  # a new module that trains in full (modules_to_save), if any
        self.default_targets: list[str] | None = None  # adapter targets where the model has no query/value
        self.stats: dict = {}  # counts for metrics.json (sequences cut, padding...)

    def prepare(self, train: list[dict], validation: list[dict], test: list[dict]) -> None:
        """Whatever can fail on the data (tokenizing, templates), done before the run writes anything."""

    def train_loader(self, examples: list[dict], epoch: int):
        """The batches of one pass; their order depends on (seed, epoch) only, so a resumed run sees the same."""
        raise NotImplementedError

    def eval_loader(self, examples: list[dict]):
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        """(the batch's mean loss, how many units it counts: examples, or response tokens for sft). Labels of
        generative.IGNORE (-100) count in neither (rows repeated to even out a last batch: distributed.without_repeats)."""
        raise NotImplementedError

    def validate(self, model: nn.Module, loader, accelerator) -> dict:
        """{self.score: value, ...}, gathered: the same on every process."""
        raise NotImplementedError

    def test(self, model: nn.Module, loader, examples: list[dict], accelerator) -> dict:
        raise NotImplementedError


class ScoreHead(Objective):
    """Classification and multiple choice: a new score head on the model, cross-entropy over the classes
    (or the choices' scores), accuracy on validation and test."""

    score, higher_is_better = "validation_accuracy", True

    def __init__(self, s: TrainSettings, task: TaskData):
        super().__init__(s, task)
        if task.images:
            if s.quantize is not None:
                raise ValueError(f"--quantize {s.quantize} is not supported for image classification: bitsandbytes "
                                 "quantizes transformers text models as they load; train image models in full "
                                 "precision (leave out --quantize)")
            self.model, processor, self.default_targets = load_image_classifier(s.model, task.num_labels, s.image_size)
            self.collate = ImageCollator(processor)
        else:
            self.model, self.tokenizer = load_model(s.model, task.num_labels, s.quantize)
            self.collate = Collator(self.tokenizer, task.kind, s.max_length)
        self.head = head_name(self.model)

    def train_loader(self, examples, epoch: int):
        # The epoch's order depends on (seed, epoch) only, so a resumed run sees the same batches.
        return make_loader(examples, self.collate, self.s.batch_size, self.s.seed * 1000 + epoch)

    def eval_loader(self, examples):
        return make_loader(examples, self.collate, self.s.eval_batch_size, None)

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        labels = batch["labels"]
        count = int((labels != generative.IGNORE).sum())
        loss = torch.nn.functional.cross_entropy(forward_logits(model, batch).float(), labels, reduction="sum")
        return loss / max(count, 1), count

    def validate(self, model, loader, accelerator) -> dict:
        return {"validation_accuracy": evaluate(model, loader, accelerator)}

    def test(self, model, loader, examples, accelerator) -> dict:
        return {"test_accuracy": evaluate(model, loader, accelerator)}


class Generative(Objective):
    """sft: the causal-LM loss on the response tokens, length-grouped batches; validation loss each
    epoch; test loss and greedy answers scored by exact match at the end (generative.py). The model's own
    output layer writes the answers: no new head to train in full."""

    score, higher_is_better = "validation_loss", False

    def __init__(self, s: TrainSettings, task: TaskData):
        super().__init__(s, task)
        self.model, self.tokenizer = load_causal_lm(s.model, s.quantize)
        self.collate = generative.SFTCollator(self.tokenizer.pad_token_id)

    def prepare(self, train, validation, test) -> None:
        """Tokenize every set once (a template or a row that cannot be rendered stops the run here, before
        anything is written), counting the sequences cut to --max-length."""
        self.features = {}
        for name, examples in (("train", train), ("validation", validation), ("test", test)):
            self.features[id(examples)], cut = generative.encode_all(examples, self.tokenizer, self.s.max_length)
            for what, n in cut.items():
                self.stats[f"{name}_{what}"] = n  # (prompts lose their start, responses their end)

    def train_loader(self, examples, epoch: int):
        ordered = generative.length_grouped(self.features[id(examples)], self.s.batch_size, self.s.seed * 1000 + epoch)
        self.stats["padding_fraction"] = generative.padding_fraction(ordered, self.s.batch_size)
        return make_loader(ordered, self.collate, self.s.batch_size, None)

    def eval_loader(self, examples):
        ordered = generative.length_grouped(self.features[id(examples)], self.s.eval_batch_size, 0)
        return make_loader(ordered, self.collate, self.s.eval_batch_size, None)

    def loss(self, model, batch):
        return generative.response_loss(model, batch)

    def validate(self, model, loader, accelerator) -> dict:
        return {"validation_loss": generative.mean_loss(model, loader, accelerator)}

    def test(self, model, loader, examples, accelerator) -> dict:
        from accelerate.utils import gather_object

        result = {"test_loss": generative.mean_loss(model, loader, accelerator)}
        # Under FSDP every forward is a collective: each process gets as many prompts (the last repeated) and
        # generation goes on in all of them until every one is done (synced_gpus).
        sharded = is_sharded(accelerator)
        with accelerator.split_between_processes(list(range(len(examples))), apply_padding=sharded) as mine:
            features = self.features[id(examples)]  # encoded once, in prepare()
            prompts = [generative.prompt_of(features[i]) for i in mine]
            answers = generative.generate(accelerator.unwrap_model(model), self.tokenizer, prompts,
                                          self.s.max_new_tokens, self.s.eval_batch_size, synced=sharded)
            scored = [(i, a, generative.is_correct(a, examples[i])) for i, a in zip(mine, answers)]
        scored = sorted(dict((i, (i, a, ok)) for i, a, ok in gather_object(scored)).values())  # (repeats once)
        result["test_exact_match"] = sum(ok for _, _, ok in scored) / max(len(scored), 1)
        for i, answer, ok in scored[:5]:  # a sample, for the log
            log.info("test answer %s: %r -> %r", "right" if ok else "wrong",
                     generative.first_words(generative.render(examples[i], self.tokenizer)[0]), answer.strip())
        model.train()
        return result


def objective_for(s: TrainSettings, task: TaskData) -> Objective:
    """The objective of a run whose task (s.task) is resolved: sft writes text, the others score."""
    return (Generative if s.task == "sft" else ScoreHead)(s, task)
