"""Audio tokens (Qwen2-Audio, tiny random model with its real processor built offline): time
spans checked by perturbing the waveform, neighbours equal a brute force, the command."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from latentlens.audio import audio_token_states, explain_audio, load_audio
from latentlens.errors import LatentLensError, UnsupportedArchitectureError
from latentlens.extract import build_index
from latentlens.models.hooks import get_hidden_states
from tests.tiny import SENTENCES
from tests.vlm_families import _tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
RATE = 16000
TOKENS = ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]


@pytest.fixture(scope="module")
def qwen2_audio():
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    tok = _tokenizer(TOKENS)
    fe = WhisperFeatureExtractor(feature_size=16, sampling_rate=RATE, hop_length=160,
                                 chunk_length=2, n_fft=400)  # fmt: skip
    processor = Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok)
    torch.manual_seed(0)
    config = Qwen2AudioConfig(
        audio_config=dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2,
                          encoder_ffn_dim=32, d_model=16, max_source_positions=100),
        text_config=dict(model_type="qwen2", vocab_size=len(tok) + 8, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2),
        audio_token_id=tok.convert_tokens_to_ids("<|AUDIO|>"),
    )  # fmt: skip
    return Qwen2AudioForConditionalGeneration(config).eval(), processor


@pytest.fixture(scope="module")
def qwen2_5_omni():
    """Qwen2.5-Omni's thinker (audio, images, video → text), tiny, with its real processor."""
    import tempfile

    from transformers import (
        AutoTokenizer,
        Qwen2_5OmniProcessor,
        Qwen2_5OmniThinkerConfig,
        Qwen2_5OmniThinkerForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        WhisperFeatureExtractor,
    )

    from tests.tiny import tiny_tokenizer

    special = {
        "audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>",
        "audio_eos_token": "<|audio_eos|>", "image_token": "<|IMAGE|>",
        "video_token": "<|VIDEO|>", "vision_bos_token": "<|vision_bos|>",
        "vision_eos_token": "<|vision_eos|>",
    }  # fmt: skip
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(special.values())})
    with tempfile.TemporaryDirectory() as d:  # the processor reads tokenizer.audio_token_id
        tok.save_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d, extra_special_tokens=special)
    fe = WhisperFeatureExtractor(feature_size=16, sampling_rate=RATE, hop_length=160,
                                 chunk_length=2, n_fft=400)  # fmt: skip
    processor = Qwen2_5OmniProcessor(image_processor=Qwen2VLImageProcessor(),
                                     video_processor=Qwen2VLVideoProcessor(),
                                     feature_extractor=fe, tokenizer=tok)  # fmt: skip
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in special.items()}
    config = Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2,
                          encoder_ffn_dim=32, d_model=16, output_dim=32,
                          max_source_positions=100, n_window=50),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                           out_hidden_size=32, fullatt_block_indexes=[0]),
        text_config=dict(vocab_size=len(tok) + 8, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                          "mrope_section": [2, 1, 1]}),
        audio_token_index=ids["audio_token"], image_token_index=ids["image_token"],
        video_token_index=ids["video_token"], audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"],
        vision_start_token_id=ids["vision_bos_token"],
        vision_end_token_id=ids["vision_eos_token"],
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen2_5OmniThinkerForConditionalGeneration(config).eval(), processor


def noise_wave(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.RandomState(seed).randn(int(seconds * RATE)) * 0.1).astype(np.float32)


@pytest.mark.parametrize("family", ["qwen2_audio", "qwen2_5_omni"])
def test_each_tokens_time_span_is_where_the_waveform_moves_it(family, request):
    model, processor = request.getfixturevalue(family)
    wav = noise_wave(1.0)
    base = audio_token_states(model, processor, wav, [0])
    assert len(base.addresses) == 25 and base.seconds_per_token == pytest.approx(0.04)
    assert [a.start for a in base.addresses] == pytest.approx([0.04 * i for i in range(25)])
    assert base.addresses[-1].end == pytest.approx(1.0)
    rs = np.random.RandomState(1)
    for t0 in (0.01, 0.21, 0.41, 0.53, 0.97):  # 20 ms windows inside one token's span
        moved = wav.copy()
        a, b = int(t0 * RATE), int((t0 + 0.02) * RATE)
        moved[a:b] += rs.randn(b - a).astype(np.float32) * 2
        got = audio_token_states(model, processor, moved, [0])
        delta = (got.states[0] - base.states[0]).norm(dim=1)
        most = base.addresses[int(delta.argmax())]
        assert most.start <= (t0 + 0.01) < most.end, (t0, most)


def test_explain_audio_neighbours_are_a_brute_force_at_the_reported_positions(qwen2_audio):
    model, processor = qwen2_audio
    index = build_index("tiny-qwen2-audio", SENTENCES, layers=[1, 2], model=model,
                        tokenizer=processor.tokenizer, show_progress=False)  # fmt: skip
    wav = noise_wave(0.6, seed=3)
    ex = explain_audio(model, processor, wav, index, [1, 2], top_k=3)
    inputs = processor(text=["<|audio_bos|><|AUDIO|><|audio_eos|>Describe this audio."],
                       audio=[wav], sampling_rate=RATE, return_tensors="pt")  # fmt: skip
    audio_id = model.config.audio_token_id
    positions = (inputs["input_ids"][0] == audio_id).nonzero()[:, 0].tolist()
    assert [a.sequence_position for a in ex.addresses] == positions
    with torch.inference_mode():
        hs = get_hidden_states(model, layers=[1, 2], **inputs)
    for layer in (1, 2):
        for a in ex.addresses[::4]:
            q = hs[layer][0, a.sequence_position].double()
            q = q / q.norm()
            hits = []
            for bank_layer, data in index._layers_data.items():
                emb = data["embeddings"].double()
                sims = emb @ q / emb.norm(dim=1)
                for i in sims.argsort(descending=True)[:3].tolist():
                    hits.append((float(sims[i]), bank_layer, data["metadata"][i]["caption"]))
            want = sorted(hits, key=lambda h: -h[0])[:3]
            got = ex.neighbors[layer][a.index]
            assert [n.caption for n in got] == [w[2] for w in want]
            assert [n.similarity for n in got] == pytest.approx([w[0] for w in want], abs=1e-5)
    doc = ex.to_dict()
    tokens = doc["layers"]["2"]["tokens"]
    assert len(tokens) == len(ex.addresses) == 15
    assert tokens[3]["start"] == pytest.approx(0.12) and tokens[3]["end"] == pytest.approx(0.16)


def write_wav(path, x: np.ndarray, rate: int, width: int, channels: int = 1) -> None:
    scale = {1: 127, 2: 2**15 - 1, 3: 2**23 - 1, 4: 2**31 - 1}[width]
    ints = np.round(np.clip(x, -1, 1) * scale).astype(np.int64)
    ints = np.repeat(ints[:, None], channels, axis=1).reshape(-1)
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()
    elif width == 3:
        v = ints & 0xFFFFFF
        raw = np.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], 1).astype(np.uint8).tobytes()
    else:
        raw = ints.astype({2: "<i2", 4: "<i4"}[width]).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)


def test_wav_files_of_every_width_rate_and_channel_count(tmp_path):
    x = np.sin(np.linspace(0, 40, 8000)).astype(np.float32) * 0.5
    for width, tol in ((1, 1e-2), (2, 1e-4), (3, 1e-6), (4, 1e-6)):
        write_wav(tmp_path / f"w{width}.wav", x, RATE, width, channels=2)
        got = load_audio(tmp_path / f"w{width}.wav", RATE)
        assert got.shape == x.shape and np.abs(got - x).max() < tol, width
    write_wav(tmp_path / "slow.wav", x, 8000, 2)  # one second at 8 kHz → 16 kHz
    assert load_audio(tmp_path / "slow.wav", RATE).shape == (16000,)
    (tmp_path / "bad.wav").write_bytes(b"RIFF....nope")
    with pytest.raises(LatentLensError, match="WAV"):
        load_audio(tmp_path / "bad.wav", RATE)


def test_explain_audio_command_writes_time_spans(qwen2_audio, tmp_path):
    from latentlens.cli import main

    model, processor = qwen2_audio
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    (tmp_path / "corpus.txt").write_text("\n".join(SENTENCES))
    clip = (np.random.RandomState(5).randn(11025) * 0.1).astype(np.float32)  # 0.5 s at 22.05 kHz
    write_wav(tmp_path / "clip.wav", clip, 22050, 2, channels=2)
    args = ["explain-audio", str(tmp_path / "clip.wav"), "--model", str(tmp_path / "model"),
            "--build-bank", str(tmp_path / "corpus.txt"), "--bank", str(tmp_path / "bank"),
            "--layers", "1,2", "--top-k", "2", "--device", "cpu",
            "--json", str(tmp_path / "out.json")]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "0.00–0.04 s" in r.output
    doc = json.loads((tmp_path / "out.json").read_text())
    tokens = doc["layers"]["1"]["tokens"]
    assert len(tokens) == 12 and doc["duration"] == pytest.approx(0.5, abs=1e-3)
    assert tokens[-1]["end"] == pytest.approx(0.48)
    assert all(len(t["nearest_contextual_neighbors"]) == 2 for t in tokens)
    assert (tmp_path / "bank" / "config.json").is_file()  # the bank of the model's own LM
    r = CliRunner().invoke(main, args[:4] + ["--bank", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "Error:" in r.output


def test_a_model_without_audio_layout_is_named():
    from tests.vlm_families import build

    s = build("qwen2_vl")
    with pytest.raises(UnsupportedArchitectureError, match="qwen2_vl"):
        audio_token_states(s.model, s.processor, noise_wave(0.2), [0])
