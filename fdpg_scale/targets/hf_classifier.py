"""``target.scorer: hf-classifier``: a local Hugging Face sequence classifier as a constraint, a reward or a feature.

The directory (a local one, or the snapshot of a Hub id in the local Hugging Face cache) is loaded once
(``AutoModelForSequenceClassification`` + ``AutoTokenizer``), put in eval mode (deterministic: no dropout),
frozen (``requires_grad_(False)``), in ``dtype`` (in a run: ``scorer_args.dtype``, else the run's ``model.dtype``)
and moved to the rank's device. Each rank scores its own samples,
``batch_size`` texts per forward under ``torch.no_grad``. The score of a text is

- ``softmax(logits)[label]`` for a single-label classifier (num_labels ≥ 2): the probability of ``label``;
- ``sigmoid(logits[label])`` for a multi-label one (``problem_type: multi_label_classification``);
- ``logits[0]`` for a one-output head (num_labels = 1, a reward model);

and, with ``threshold`` set, ``1.0`` where that score is > threshold, else ``0.0`` (a pointwise constraint
b(x) = [score > threshold] needs it: a probability is always > 0).

The model is a plain torch module beside the ZeRO-3 engines, not partitioned: each rank holds a full copy,
which suits the classifiers this is meant for (up to a few hundred million parameters); ``fdpg-scale plan``
counts it in each GPU's memory. It must therefore be
loaded before the engines switch transformers into ZeRO-3 loading (``HfDeepSpeedConfig``), which is checked.
"""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import torch

from fdpg_scale.errors import ConfigError
from fdpg_scale.targets.samples import Samples
from fdpg_scale.targets.user_scorers import checked_values

__all__ = ["HFClassifier", "build_hf_classifier", "local_model_dir"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class HFClassifier:
    """Samples -> float32 [B]: the classifier's score of each decoded text (module docstring)."""

    def __init__(self, *, path: str, label: str | int, threshold: float | None = None, batch_size: int = 32,
                 max_length: int | None = None, dtype: str = "fp32", device: str | torch.device = "cpu",
                 where: str = "target.scorer hf-classifier"):
        """path: the local model directory, or a Hub id in the local cache; label: a name of the config's
        ``id2label`` or an index; threshold: None (the score itself) or a number (score > threshold as 1/0); batch_size: texts per forward;
        max_length: tokens kept per text (default: the model's maximum positions); dtype: fp32, bf16 or fp16;
        device: where the model runs (the rank's device); where: the config key for errors."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        self.where = f"{where} {path!r}"
        if dtype not in _DTYPES:
            raise ConfigError(f"{self.where}: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ConfigError(f"{self.where}: batch_size must be an integer ≥ 1, got {batch_size!r}")
        if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
            raise ConfigError(f"{self.where}: threshold must be a finite number, got {threshold!r}")
        local = local_model_dir(path, self.where)
        if not local.is_dir():
            raise ConfigError(f"{self.where}: no such directory (a local Hugging Face classifier directory or a Hub "
                              f"id in the local cache is expected; nothing is downloaded)")
        if is_deepspeed_zero3_enabled():
            raise RuntimeError(f"{self.where}: load the classifier before the ZeRO-3 engines: transformers would "
                               f"partition it with zero.Init")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(local)
            self.model = AutoModelForSequenceClassification.from_pretrained(local, dtype=_DTYPES[dtype])
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"{self.where}: cannot load a sequence classifier and its tokenizer from it "
                              f"({type(err).__name__}: {first})") from None
        config = self.model.config
        self.label_index = _label_index(label, config, self.where)
        if self.tokenizer.pad_token_id is None:  # GPT-2/Llama tokenizers define none; masks make it harmless
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Right padding: every text keeps the positions 0 … n−1 it has alone (absolute position embeddings,
        # GPT-2's) and GPT-2-style heads read the last non-pad token. Left padding shifted the scores by 0.04.
        self.tokenizer.padding_side = "right"
        if config.pad_token_id is None:  # GPT-2-style heads find each row's last token through it
            config.pad_token_id = self.tokenizer.pad_token_id
        positions = getattr(config, "max_position_embeddings", None)
        self.max_length = max_length if max_length is not None else positions
        if self.max_length is not None and not (isinstance(self.max_length, int) and self.max_length >= 1):
            raise ConfigError(f"{self.where}: max_length must be an integer ≥ 1, got {self.max_length!r}")
        self.threshold = threshold
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.model.to(self.device).eval().requires_grad_(False)
        self.multi_label = config.problem_type == "multi_label_classification"

    @torch.no_grad()
    def logits(self, texts: list[str], *, add_special_tokens: bool = True) -> torch.Tensor:
        """float32 [len(texts), num_labels]: the model's raw outputs for each text, on the CPU, ``batch_size``
        texts per forward. add_special_tokens: False for texts a chat template rendered (they hold their own)."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = [_nonempty(t, self.tokenizer) for t in texts[start:start + self.batch_size]]
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, truncation=self.max_length is not None,
                                 max_length=self.max_length, add_special_tokens=add_special_tokens)
            out.append(self.model(input_ids=enc["input_ids"].to(self.device),
                                  attention_mask=enc["attention_mask"].to(self.device)).logits.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.num_labels)

    def scores(self, texts: list[str]) -> torch.Tensor:
        """float32 [len(texts)]: the score of each text (before any threshold), on the CPU."""
        logits = self.logits(texts)
        if logits.shape[-1] == 1:
            return logits[:, 0]
        if self.multi_label:
            return torch.sigmoid(logits[:, self.label_index])
        return torch.softmax(logits, dim=-1)[:, self.label_index]

    def __call__(self, samples: Samples) -> torch.Tensor:
        """float32 [B]: the scores of ``samples.texts`` (1/0 against ``threshold`` when set), checked finite."""
        if samples.texts is None:
            raise ValueError(f"{self.where} reads decoded texts, but these samples have none")
        s = self.scores(list(samples.texts))
        if self.threshold is not None:
            s = (s > self.threshold).float()
        return checked_values(s, samples, self.where)


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def local_model_dir(path: str, where: str) -> Path:
    """``path`` when it exists; else, for a Hub id (``owner/name``), its snapshot in the local Hugging Face cache
    (one-line ConfigError naming the id and the cache when it is not there; nothing is downloaded).

    The same rule as ``model.path`` (``fdpg_scale.models.hub``), written here because targets do not import models.
    """
    if Path(path).exists() or not _HUB_ID.match(path) or ".." in path:
        return Path(path)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        raise ConfigError(f"{where} is not a local path, and the Hub model {path!r} is not in the local Hugging Face "
                          f"cache (looked in {constants.HF_HUB_CACHE}); fetch it first with `hf download {path}`") \
            from None


def _nonempty(text: str, tokenizer) -> str:
    # A sequence classifier needs at least one token, and a generation may decode to "" (an immediate EOS).
    # Tokenizers that add special tokens (BERT's [CLS] [SEP]) already give one; others get the EOS text.
    if text or tokenizer(text)["input_ids"]:
        return text
    return tokenizer.eos_token or tokenizer.pad_token


def _label_index(label, config, where: str) -> int:
    names = {str(v): int(k) for k, v in (config.id2label or {}).items()}
    n = config.num_labels
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise ConfigError(f"{where}: label must be a label name or an index, got {label!r}")
    if isinstance(label, int):
        if not 0 <= label < n:
            raise ConfigError(f"{where}: label index {label} is out of range for its {n} labels {sorted(names)}")
        return label
    if label not in names:
        raise ConfigError(f"{where}: label {label!r} is not one of its labels {sorted(names, key=names.get)}")
    return names[label]


def build_hf_classifier(scorer_args: dict, *, where: str, device) -> HFClassifier:
    """An ``HFClassifier`` from ``target.scorer_args``, the arguments checked against its signature."""
    sig = inspect.signature(HFClassifier.__init__)
    allowed = [p for p in sig.parameters if p not in ("self", "device", "where")]
    unknown = sorted(set(scorer_args) - set(allowed))
    if unknown:
        raise ConfigError(f"{where} hf-classifier: unknown scorer_args {unknown} (valid: {', '.join(allowed)})")
    missing = [p for p in ("path", "label") if p not in scorer_args]
    if missing:
        raise ConfigError(f"{where} hf-classifier: scorer_args {missing} are required (valid: {', '.join(allowed)})")
    return HFClassifier(**scorer_args, device=device, where=where)
