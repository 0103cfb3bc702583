"""The inspection path: TransformerLens' TransformerBridge around the very same HF model.

Use it for `run_with_cache`, hook names and interactive work; generation at scale goes through
`esr.generate` (HF hooks), and the tests hold the two to the same tokens and logits.
"""

from __future__ import annotations

from esr.models import LoadedModel


def load_bridge(lm: LoadedModel):
    """Wrap `lm.model` (no second copy of the weights) with TransformerLens hook points."""
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(
        lm.path, hf_model=lm.model, tokenizer=lm.tokenizer, device=lm.input_device,
        dtype=lm.model.dtype,
    )
