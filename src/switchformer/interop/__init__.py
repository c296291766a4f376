"""Interoperability: Hugging Face ``transformers`` Switch checkpoints, our own folders, T5X/flaxformer arrays.

``from_pretrained(PATH)`` loads an HF Switch Transformers folder (``config.json`` with ``model.safetensors`` or
``pytorch_model.bin``, sharded or not) or a switchformer folder; ``save_pretrained(model, PATH, format="hf")``
writes a folder ``SwitchTransformersForConditionalGeneration.from_pretrained`` loads. All names go through one
explicit key map per format (``hf_keys.py``, ``t5x.py``). On identical weights, an HF checkpoint loaded here
reproduces ``transformers``' logits and hidden states (to float32 rounding), including which tokens it drops.

Deliberate differences from the ``transformers`` port (also in docs/interop.md), and how interop bridges them:

- **Capacity.** Ours follows the paper and flaxformer: ``capacity_factor * tokens_per_group / num_experts``
  (rounded, at least ``min_capacity``) over groups of ``group_size`` tokens, 1.25 in training and 2.0 in
  evaluation. HF uses a fixed ``expert_capacity`` (default 64) per *sequence*, in training and evaluation alike.
  Loading an HF config sets ``grouping='sequence'`` and ``expert_capacity``, so drop patterns match; exporting a
  factor-based model to HF writes ``expert_capacity=64`` with a warning (``2**31 - 1`` for ``dropless``).
- **Padding.** By default padding claims no expert slot and counts in no loss (``ignore_padding_tokens=True``).
  HF routes padding like any token: transformers 5 stores ``router_ignore_padding_tokens`` but never applies it.
  Loading maps that flag (false in every released config), which reproduces HF.
- **Auxiliary losses.** Ours: the load-balancing loss per layer and routing group on pre-capacity choices,
  averaged over Switch layers (T5X), coefficient 1e-2. HF: one loss over all layers' router logits concatenated
  per stack (older releases used post-capacity choices), encoder plus decoder, coefficient 1e-3, and none at
  all for a stack whose every layer is sparse (it checks ``sparse_step > 1``). The z-loss likewise. Coefficients
  are mapped both ways; the loss values themselves differ by design.
- **Router.** Jitter multiplies the router's own copy of its input (HF: in place, so experts see the noise;
  training only, so evaluation parity is unaffected). The router always runs in float32 (HF: ``router_dtype``;
  others are logged). Fresh initialisation is the paper's truncated normal with scale 0.1 (HF: std 1.0 for the
  router); initialisation does not matter when weights are loaded.
- **Placement of Switch layers.** HF places them per stack (``num_sparse_encoder_layers``,
  ``num_sparse_decoder_layers``: layer ``i`` is sparse when ``i % step == 1``, or every layer for step 1). Loading
  gives one ``sparse_every`` when its rule reproduces both stacks, else the explicit per-stack ``sparse_layers``
  and ``decoder_sparse_layers``, so every layout HF can build loads (a dense stack, stacks of different depths).
  HF quirk reproduced: ``num_sparse_*_layers=0`` still makes layer 1 sparse; a dense HF stack needs
  ``num_sparse_*_layers > num_layers``, which is what exporting a dense stack writes. Exporting a placement HF's
  rule cannot produce raises.
- **Embeddings.** Tied models (``tie_word_embeddings=true``) have one table for the encoder, the decoder and the
  output layer; loading checks that any stored copies equal ``shared.weight``. Untied models as transformers 5
  builds them read the encoder's and the decoder's tokens from ``encoder/decoder.embed_tokens``, which may
  differ: ``from_pretrained`` then gives the model ``input_embeddings='per-stack'`` (our ``shared`` is the
  encoder's table, ``decoder_embed`` the decoder's), else one table (transformers 4 files store ``shared.weight``
  alone). An untied model's ``shared.weight``, which transformers' forward does not read, is not kept: exporting
  writes the encoder's table there.
- **Expressiveness.** HF's Switch port has no gated FFN, no top-k > 1, no decoder-only model, no "no token left
  behind" or batch-prioritised routing, and no expert dropout distinct from ``dropout_rate``. Its FFN is the one
  ``dense_act_fn`` names (relu, gelu); T5's ``feed_forward_proj`` is ignored there and here. Gated checkpoints in
  T5.1.1 naming (``wi_0``/``wi_1``) load here with ``dense_act_fn="gated-gelu"`` (the value transformers' config
  documents for them, which it cannot build); exporting gated, top-k or decoder-only models to HF raises, other
  options warn. Our full config travels in the HF ``config.json`` as ``switchformer_config`` and is restored on
  load as long as the HF fields still agree with it.
- **Generation.** Greedy decoding equals ``transformers.generate(do_sample=False)`` token for token; beam search
  ranks hypotheses like HF's (same scores); finished sequences are always padded with ``pad_token_id``.
"""

from switchformer.interop.checkpoint_io import (
    CheckpointFormat,
    from_pretrained,
    load_config,
    model_from_state_dict,
    save_pretrained,
)
from switchformer.interop.files import copy_tokenizer_files
from switchformer.interop.hf_config import config_from_hf, config_to_hf
from switchformer.interop.hf_keys import from_hf_state_dict, hf_key_map, to_hf_state_dict
from switchformer.interop.key_map import CheckpointError, ParamMapping, Transform
from switchformer.interop.t5x import from_t5x, t5x_config, t5x_key_map, to_t5x
from switchformer.models.base import SwitchModelBase

# Models know no file formats (interop sits above them); they get the HF-style method from here, so that
# ``model.save_pretrained(folder, format="hf")`` is ``save_pretrained(model, folder, format="hf")``.
SwitchModelBase.save_pretrained = save_pretrained  # type: ignore[attr-defined]

__all__ = [
    "CheckpointError",
    "CheckpointFormat",
    "ParamMapping",
    "Transform",
    "config_from_hf",
    "config_to_hf",
    "copy_tokenizer_files",
    "from_hf_state_dict",
    "from_pretrained",
    "from_t5x",
    "hf_key_map",
    "load_config",
    "model_from_state_dict",
    "save_pretrained",
    "t5x_config",
    "t5x_key_map",
    "to_hf_state_dict",
    "to_t5x",
]
