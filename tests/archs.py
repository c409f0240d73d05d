"""Every causal-LM architecture of the installed transformers, as a tiny random model.

`tiny_any(model_type)` shrinks the type's default config (d=32, 3 layers, vocab 128) and
builds it; `check(model_type)` runs the open-world checks of latentlens on it:

- a bank builds through the public API at layers 1 and n-1;
- `get_hidden_states` equals HF's `output_hidden_states` at those layers;
- LogitLens top-5 at layer n equals the top-5 of the model's own logits.

`python tests/archs.py --markdown` prints the compatibility table of the README.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.tiny import _COMMON, BOS_ID, SENTENCES, tiny_tokenizer

MAX_PARAMS = 3_000_000

_SMALL: dict[str, Any] = {
    **_COMMON,  # vocab 128, d=32, 3 layers, 4 heads, special ids
    "head_dim": 8,
    "max_position_embeddings": 128,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "d_model": 32,
    "n_embd": 32,
    "n_layer": 3,
    "n_head": 4,
    "n_positions": 128,
    "n_inner": 64,
    "decoder_layers": 3,
    "encoder_layers": 3,
    "decoder_attention_heads": 4,
    "encoder_attention_heads": 4,
    "decoder_ffn_dim": 64,
    "encoder_ffn_dim": 64,
    "ffn_dim": 64,
    "num_layers": 3,
    "n_layers": 3,
    "n_heads": 4,
    "d_ff": 64,
    "mamba_n_heads": 4,
    "mamba_d_head": 16,
    "mlp_hidden_size": 64,
    "tie_word_embeddings": False,
}
# Per-type fixes the generic sizes above do not fit.
_PER_TYPE: dict[str, dict[str, Any]] = {
    "reformer": {"is_decoder": True},
}


# Types whose tiny models build but cannot pass, with the reason (README table).
KNOWN_FAILING = {
    "deepseek_v4": "residual stream of 4 parallel streams (hyper-connections)",
    "hy_v4": "residual stream of 4 parallel streams (hyper-connections)",
    "qwen4_exp_text": "residual stream of 4 parallel streams (hyper-connections)",
    "dory": "looped blocks: the last block runs more than once per forward",
    "hrm_text": "hierarchical recurrent blocks: no block list of the config's length",
    "xlm": "no block modules (attention / FFN / norms in separate ModuleLists)",
    "inkling_text": "head input rescaled and vocabulary truncated inside the forward",
}


def causal_lm_types() -> list[str]:
    """Model types of the installed transformers' causal-LM mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


class NotBuildable(Exception):
    """The generic tiny config does not produce a small working model of this type."""


def tiny_any(model_type: str) -> Any:
    """A tiny random `AutoModelForCausalLM` of any type (fp32, eval).

    Raises:
        NotBuildable: the config, the model or its forward fails, or it is too large.
    """
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config = CONFIG_MAPPING[model_type](**{**_SMALL, **_PER_TYPE.get(model_type, {})})
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(config)
        size = sum(p.numel() for p in shell.parameters())
        del shell
        if size > MAX_PARAMS:
            raise NotBuildable(f"{size:,} parameters with the generic tiny config")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        ids = torch.tensor([[BOS_ID, 5, 9, 12, 7]])
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except NotBuildable:
        raise
    except Exception as err:  # noqa: BLE001 - any failure means "not buildable here"
        raise NotBuildable(f"{type(err).__name__}: {_first_line(err)}") from err
    return model


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else "")[:160]


@dataclass
class Outcome:
    """What `check` found for one model type."""

    model_type: str
    status: str  # "ok", "fails", "not buildable"
    detail: str = ""


def check(model_type: str) -> Outcome:
    """Run the open-world checks on a tiny model of `model_type` (see module docstring)."""
    import latentlens
    from latentlens.models import num_layers

    try:
        model = tiny_any(model_type)
    except NotBuildable as err:
        return Outcome(model_type, "not buildable", str(err))
    try:
        tok = tiny_tokenizer()
        n = num_layers(model)
        layers = sorted({1, max(n - 1, 1)})
        probe = sorted({*layers, 2, n, min(n, layers[-1] + 1)})
        index = latentlens.build_index(
            None, SENTENCES, layers=layers, model=model, tokenizer=tok, show_progress=False
        )
        assert index.available_layers == layers, index.available_layers
        batch = tok(SENTENCES[:2], return_tensors="pt", padding=True)
        ours = latentlens.get_hidden_states(
            model, batch["input_ids"], batch["attention_mask"], layers=probe
        )
        with torch.no_grad():
            ref = model(**batch, output_hidden_states=True, use_cache=False)
        mask = batch["attention_mask"].bool()
        # HF's own off-by-one for some recurrent models: hidden_states[i] is the output
        # of block i there (no embeddings entry); ours is always the output of i blocks.
        shift = 1 if _close(ours[2][mask], ref.hidden_states[1][mask]) else 0
        for layer in layers:
            got, want = ours[layer + shift][mask], ref.hidden_states[layer][mask]
            if not _close(got, want):
                err = float((got - want).abs().max())
                raise AssertionError(f"hidden state {layer} differs from HF's by {err:.2e}")
        note = SHIFTED if shift else ""
        lens = latentlens.LogitLens(model, tok, top_k=5)
        _, top = lens.topk(ours[n][mask])
        want_top = torch.topk(ref.logits[mask].float(), 5, dim=-1).indices
        if not torch.equal(top, want_top.cpu()):
            raise AssertionError("LogitLens top-5 at layer n differs from the model's logits")
        # the bank is searchable and points at the corpus
        hit = index.search(ours[layers[0]][0, 1], top_k=1)[0][0]
        assert hit.caption in SENTENCES
    except Exception as err:  # noqa: BLE001 - reported in the table
        return Outcome(model_type, "fails", f"{type(err).__name__}: {_first_line(err)}")
    return Outcome(model_type, "ok", note)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-4)


SHIFTED = (
    "HF's `hidden_states[i]` is the output of block i here (one off from every other "
    "model); ours is the output of i blocks"
)


def check_all(types: list[str] | None = None) -> list[Outcome]:
    """`check` every causal-LM type, quietly."""
    logging.disable(logging.WARNING)
    out = []
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        for model_type in types or causal_lm_types():
            out.append(check(model_type))
    logging.disable(logging.NOTSET)
    return out


def markdown(outcomes: list[Outcome]) -> str:
    """The README's compatibility section body."""
    import transformers

    ok = [o for o in outcomes if o.status == "ok"]
    built = [o for o in outcomes if o.status != "not buildable"]
    lines = [
        f"Checked on transformers {transformers.__version__} by `python tests/archs.py "
        f"--markdown` (the same checks run in `tests/test_archs.py`): **{len(ok)} of "
        f"{len(built)}** causal-LM architectures that build as tiny random models pass "
        f"({len(outcomes)} in the mapping).",
        "",
        "Passing: " + ", ".join(f"`{o.model_type}`" for o in ok) + ".",
        "",
    ]
    shifted = [o.model_type for o in ok if o.detail == SHIFTED]
    if shifted:
        lines += [", ".join(f"`{t}`" for t in shifted) + ": pass; " + SHIFTED + ".", ""]
    failing = [o for o in outcomes if o.status == "fails"]
    if failing:
        lines += ["| fails | why | what latentlens says |", "| --- | --- | --- |"]
        for o in failing:
            detail = o.detail.replace("|", "\\|")
            lines.append(
                f"| `{o.model_type}` | {KNOWN_FAILING.get(o.model_type, '?')} | {detail} |"
            )
        lines.append("")
    skipped = [o for o in outcomes if o.status == "not buildable"]
    if skipped:
        lines += [
            "<details><summary>Not buildable as tiny random models with the generic config "
            f"({len(skipped)}; untested, not known to fail)</summary>",
            "",
            "| model type | why |",
            "| --- | --- |",
        ]
        for o in skipped:
            detail = o.detail.replace("|", "\\|")
            lines.append(f"| `{o.model_type}` | {detail} |")
        lines += ["", "</details>"]
    return "\n".join(lines)


def main() -> None:
    """Print the outcome of every type (or the README table with --markdown)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("types", nargs="*")
    args = parser.parse_args()
    outcomes = check_all(args.types or None)
    if args.markdown:
        print(markdown(outcomes))  # noqa: T201
    else:
        for o in outcomes:
            print(f"{o.model_type:32s} {o.status:14s} {o.detail}")  # noqa: T201


if __name__ == "__main__":
    main()
