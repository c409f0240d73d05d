"""Audio tokens of audio-text models: where each one sits in time, its hidden states, its
nearest contexts.

The facts per family are data (`AUDIO_FAMILIES`): which config key holds the audio
placeholder id and how many feature frames one token pools. With the feature extractor's
hop length and sampling rate that gives each token's time span: Qwen2-Audio's Whisper
features are 10 ms frames, its encoder halves them (stride-2 convolution) and pools pairs,
so a token covers 4 frames = 40 ms; token ``i`` spans ``[0.04·i, 0.04·(i+1))`` seconds.
"""

from __future__ import annotations

import logging
import os
import wave
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from latentlens.errors import LatentLensError, UnsupportedArchitectureError
from latentlens.index import ContextualIndex
from latentlens.models.hooks import get_hidden_states, validate_layers
from latentlens.models.registry import num_layers
from latentlens.results import Neighbor, neighbor_table

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AudioFamily:
    """How one family lays audio tokens out.

    Attributes:
        token_keys: config attributes that may hold the audio placeholder's id.
        frames_per_token: feature frames pooled into one token.
        prompt: the default text, with the processor's placeholder for one audio.
    """

    token_keys: tuple[str, ...]
    frames_per_token: int
    prompt: str


_QWEN_AUDIO = AudioFamily(
    token_keys=("audio_token_id", "audio_token_index"),
    frames_per_token=4,  # stride-2 convolution, then average pooling of 2
    prompt="<|audio_bos|><|AUDIO|><|audio_eos|>Describe this audio.",
)
AUDIO_FAMILIES: dict[str, AudioFamily] = {
    "qwen2_audio": _QWEN_AUDIO,
    "qwen2_5_omni_thinker": _QWEN_AUDIO,  # the same Whisper-style encoder and placeholder
}
THINKERS = {"qwen2_5_omni": "thinker"}
"""Models whose audio-text part is a submodule: model type → attribute (the full
Qwen2.5-Omni also holds a speech talker, which plays no part here)."""


def audio_family(model: nn.Module) -> AudioFamily:
    """The layout facts of ``model``.

    Raises:
        UnsupportedArchitectureError: a family without them (named in the message).
    """
    kind = getattr(model.config, "model_type", type(model).__name__)
    if kind not in AUDIO_FAMILIES:
        raise UnsupportedArchitectureError(
            f"no audio-token layout known for {kind!r}; supported: {', '.join(AUDIO_FAMILIES)}"
        )
    return AUDIO_FAMILIES[kind]


def load_audio(
    source: str | os.PathLike[str] | np.ndarray | Sequence[float], sampling_rate: int
) -> np.ndarray:
    """A mono float32 waveform at ``sampling_rate``.

    ``source``: a PCM ``.wav`` file (8/16/24/32-bit, any channels: averaged) or samples
    already at ``sampling_rate``. Other rates are resampled linearly.

    Raises:
        LatentLensError: not a readable PCM WAV file, or an empty one.
    """
    if not isinstance(source, (str, os.PathLike)):
        x = np.asarray(source, dtype=np.float32).reshape(-1)
        if x.size == 0:
            raise LatentLensError("empty audio")
        return x
    path = Path(source)
    try:
        with wave.open(str(path), "rb") as w:
            rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError, OSError) as e:
        raise LatentLensError(f"{path}: not a readable PCM WAV file ({e})") from e
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 2**15
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 2**23, v - 2**24, v)).astype(np.float32) / 2**23
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / 2**31
    else:
        raise LatentLensError(f"{path}: {8 * width}-bit samples are not supported")
    x = x.reshape(-1, channels).mean(axis=1)
    if x.size == 0:
        raise LatentLensError(f"{path} holds no samples")
    if rate != sampling_rate:
        n = max(1, round(x.size * sampling_rate / rate))
        x = np.interp(np.arange(n) * (rate / sampling_rate), np.arange(x.size), x)
    return x.astype(np.float32)


@dataclass(frozen=True)
class AudioTokenAddress:
    """Where one audio token sits: its sequence position, its index among the audio's tokens
    and the time span ``[start, end)`` in seconds it pools."""

    sequence_position: int
    index: int
    start: float
    end: float


@dataclass
class AudioStates:
    """Hidden states of an audio's tokens.

    Attributes:
        states: ``{layer: [N, d]}`` one row per audio token, in time order.
        addresses: one per token.
        duration: seconds of audio the model saw.
    """

    states: dict[int, torch.Tensor]
    addresses: list[AudioTokenAddress]
    duration: float
    sampling_rate: int
    seconds_per_token: float


def encode_audio(processor: Any, wav: np.ndarray, prompt: str) -> dict[str, Any]:
    """The processor's tensors for one audio and its prompt."""
    rate = int(processor.feature_extractor.sampling_rate)
    return dict(processor(text=[prompt], audio=[wav], sampling_rate=rate, return_tensors="pt"))


def audio_token_states(
    model: nn.Module,
    processor: Any,
    audio: Any,
    layers: Sequence[int],
    *,
    prompt: str | None = None,
) -> AudioStates:
    """Each audio token's hidden states at ``layers`` and its time span.

    ``audio``: a WAV path or samples at the feature extractor's rate. Audio longer than the
    feature extractor's window (30 s for Whisper features) is cut there, with a warning.

    Raises:
        UnsupportedArchitectureError: an audio family without layout facts.
        LatentLensError: the prompt has no audio placeholder, or the token count disagrees.
    """
    kind = getattr(model.config, "model_type", "")
    if kind in THINKERS:
        model = getattr(model, THINKERS[kind])
    family = audio_family(model)
    fe = processor.feature_extractor
    rate, hop = int(fe.sampling_rate), int(fe.hop_length)
    wav = load_audio(audio, rate)
    limit = int(getattr(fe, "n_samples", 0) or 0)
    if limit and wav.size > limit:
        logger.warning(
            "the audio is %.1f s; the feature extractor sees the first %.1f s only",
            wav.size / rate,
            limit / rate,
        )
        wav = wav[:limit]
    inputs = encode_audio(processor, wav, prompt or family.prompt)
    token_id = next(
        (
            getattr(model.config, k)
            for k in family.token_keys
            if isinstance(getattr(model.config, k, None), int)
        ),
        None,
    )
    if token_id is None:
        raise UnsupportedArchitectureError(f"the config holds none of {family.token_keys}")
    positions = (inputs["input_ids"][0] == token_id).nonzero()[:, 0]
    if positions.numel() == 0:
        raise LatentLensError(f"the prompt {prompt!r} has no audio placeholder")
    frames = (
        int(inputs["feature_attention_mask"][0].sum())
        if "feature_attention_mask" in inputs
        else None
    )
    step = family.frames_per_token * hop / rate
    duration = wav.size / rate
    if frames is not None:
        expected = ((frames - 1) // 2 + 1 - 2) // 2 + 1
        if expected != positions.numel():
            raise LatentLensError(
                f"{positions.numel()} audio tokens in the sequence, {expected} expected from "
                f"{frames} feature frames: an unknown layout"
            )
    addresses = [
        AudioTokenAddress(int(p), i, round(i * step, 6), round(min((i + 1) * step, duration), 6))
        for i, p in enumerate(positions.tolist())
    ]
    chosen = validate_layers(layers, num_layers(model))
    with torch.inference_mode():
        hs = get_hidden_states(model, layers=chosen, **inputs)
    states = {layer: hs[layer][0, positions.to(hs[layer].device)] for layer in chosen}
    return AudioStates(states, addresses, duration, rate, step)


@dataclass
class AudioExplanation:
    """Nearest contexts of every audio token, per query layer."""

    addresses: list[AudioTokenAddress]
    neighbors: dict[int, list[list[Neighbor]]]
    duration: float
    seconds_per_token: float
    top_k: int
    model_name: str = ""
    bank_name: str = ""
    audio_name: str = ""
    bank_layers: list[int] = field(default_factory=list)

    @property
    def layers(self) -> list[int]:
        """Query layers, ascending."""
        return sorted(self.neighbors)

    def table(self, every: int = 1) -> str:
        """A readable text table: each (``every``-th) token's time span and neighbours."""
        labels = [
            (a.index, f"  token {a.index:>4}  {a.start:7.2f}–{a.end:.2f} s")
            for a in self.addresses[::every]
        ]
        return neighbor_table(self.neighbors, labels)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: every token with its time span and neighbours per layer."""
        return {
            "model": self.model_name,
            "bank": self.bank_name,
            "audio": self.audio_name,
            "duration": self.duration,
            "seconds_per_token": self.seconds_per_token,
            "top_k": self.top_k,
            "contextual_layers_used": self.bank_layers,
            "layers": {
                str(layer): {
                    "visual_layer": layer,
                    "tokens": [
                        {
                            "token_index": a.index,
                            "sequence_position": a.sequence_position,
                            "start": a.start,
                            "end": a.end,
                            "nearest_contextual_neighbors": [n.to_json() for n in nbs],
                        }
                        for a, nbs in zip(self.addresses, self.neighbors[layer], strict=True)
                    ],
                }
                for layer in self.layers
            },
        }


def explain_audio(
    model: nn.Module,
    processor: Any,
    audio: Any,
    index: ContextualIndex,
    layers: Sequence[int],
    *,
    top_k: int = 5,
    prompt: str | None = None,
    bank_layers: Sequence[int] | None = None,
) -> AudioExplanation:
    """Search every audio token's states at ``layers`` in ``index`` (a bank built from the
    model's own language model)."""
    got = audio_token_states(model, processor, audio, layers, prompt=prompt)
    neighbors = {
        layer: index.search(states, top_k, bank_layers) for layer, states in got.states.items()
    }
    return AudioExplanation(
        got.addresses,
        neighbors,
        got.duration,
        got.seconds_per_token,
        top_k,
        model_name=str(getattr(model.config, "_name_or_path", "")),
        bank_name=index.model_name,
        bank_layers=list(bank_layers or index.available_layers),
    )
