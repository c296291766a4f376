"""What the encoder-decoder and the decoder-only model share: embeddings, output head, init and the loss."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from switchformer.labels import IGNORE_INDEX
from switchformer.layers.attention import Attention
from switchformer.layers.feed_forward import DenseFFN
from switchformer.layers.initialization import InitKind, InitRule, seeded_fill_
from switchformer.layers.kv_cache import DecoderCache
from switchformer.layers.linear_cross_entropy import linear_cross_entropy
from switchformer.layers.norm import RMSNorm
from switchformer.layers.position_bias import RelativePositionBias
from switchformer.layers.prepacked import drop_packed_copies
from switchformer.models.compiled_decoding import drop_compiled_step
from switchformer.models.config import InputEmbeddings, ModelConfig
from switchformer.models.outputs import LayerRouting, ModelOutput
from switchformer.models.stack import StackOutput, set_activation_checkpointing
from switchformer.moe.layer import SwitchFFN
from switchformer.moe.router import Router

if TYPE_CHECKING:
    from switchformer.models.generation import GenerationOutput


class SwitchModelBase(nn.Module):
    """Token embeddings, tied or untied output head, T5 init and the total loss.

    ``shared`` embeds the tokens of every stack, unless ``input_embeddings='per-stack'`` gives the decoder its own
    ``decoder_embed`` (``shared`` is then the encoder's).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        per_stack = config.input_embeddings is InputEmbeddings.PER_STACK
        self.decoder_embed = nn.Embedding(config.vocab_size, config.d_model) if per_stack else None
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)

    def finish_init(self) -> None:
        """After a subclass built its stacks: number the routers' jitter streams (their order in the model), then
        initialise."""
        routers = [m.router for m in self.modules() if isinstance(m, SwitchFFN)]
        for index, router in enumerate(routers):
            router.stream_id = index
        self.reset_parameters()

    def init_rules(self) -> dict[str, InitRule]:
        """How every parameter starts: T5 initialisation with the paper's scale (embeddings N(0, 1), matrices
        truncated N(0, scale / fan_in), norms 1), by parameter name."""
        scale, d_model = self.config.init_scale, self.config.d_model
        trunc = InitKind.SCALED_TRUNC_NORMAL
        rules = {"shared.weight": InitRule(InitKind.NORMAL, 1.0)}
        if self.decoder_embed is not None:
            rules["decoder_embed.weight"] = InitRule(InitKind.NORMAL, 1.0)
        if self.lm_head is not None:
            rules["lm_head.weight"] = InitRule(trunc, scale, fan_in=d_model)
        for prefix, module in self.named_modules():
            if isinstance(module, Attention | DenseFFN):
                local = module.init_rules(init_scale=scale)
            elif isinstance(module, SwitchFFN):
                local = module.init_rules()
            elif isinstance(module, RelativePositionBias):
                local = {"embedding.weight": InitRule(trunc, scale, fan_in=d_model)}
            elif isinstance(module, RMSNorm):
                local = {"weight": InitRule(InitKind.ONES)}
            else:
                continue
            rules.update({f"{prefix}.{name}": rule for name, rule in local.items()})
        return rules

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Initialise every parameter (:meth:`init_rules`) from a random stream of its own, named by ``seed`` and
        the parameter's name, so the same seed gives the same model however it is later split over ranks
        (``switchformer.parallel`` fills each rank's shard the same way). Without ``seed`` one is drawn from
        torch's global generator (``torch.manual_seed`` before building still fixes the model). A model on the
        meta device is left as it is."""
        parameters = dict(self.named_parameters())
        if any(p.is_meta for p in parameters.values()):
            return
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        rules = self.init_rules()
        if rules.keys() != parameters.keys():
            raise RuntimeError(f"no init rule for {sorted(parameters.keys() - rules.keys())}")
        for name, param in parameters.items():
            seeded_fill_(param, rules[name], seed=seed, name=name, global_shape=param.shape)

    @property
    def decoder_embedding(self) -> nn.Embedding:
        """The table the decoder stack reads its tokens from."""
        return self.decoder_embed if self.decoder_embed is not None else self.shared

    def set_activation_checkpointing(self, every: int = 1) -> int:
        """Recompute every ``every``-th block in the backward pass (0 = off); see ``models.stack``."""
        return set_activation_checkpointing(self, every)

    def generate(self, *, input_ids: torch.Tensor, **kwargs: Any) -> GenerationOutput:
        """Greedy, beam or sampled continuations with the KV cache (``switchformer.models.generation.generate``)."""
        from switchformer.models.generation import generate

        return generate(self, input_ids=input_ids, **kwargs)

    def count_labels(self, labels: torch.Tensor) -> int:
        """How many label tokens of ``labels`` count in the loss (a causal LM drops its first position)."""
        return int((labels != IGNORE_INDEX).sum())

    # How logits are computed from the output layer's input and weight; CPU decoding swaps in packed weights'
    # product for its duration (``models.prepacked``).
    output_linear = staticmethod(F.linear)

    def logits(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        return self.output_linear(*self.vocab_projection(hidden_BSD))

    def vocab_weight(self) -> torch.Tensor:
        """The output layer's weight ``[V, D]``: ``lm_head``'s, or the shared embedding table when tied."""
        return self.lm_head.weight if self.lm_head is not None else self.shared.weight

    def vocab_projection(self, hidden_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output layer's input and weight: ``logits = F.linear(input, weight)``."""
        if self.lm_head is None:
            # Tied embeddings: rescale before projecting on the vocabulary (Mesh-TF, and T5's released checkpoints).
            hidden_BSD = hidden_BSD * self.config.d_model**-0.5
        return hidden_BSD, self.vocab_weight()

    def train(self, mode: bool = True) -> SwitchModelBase:
        """As ``nn.Module.train``; training mode also drops the packed copies and the compiled step decoding made
        (their memory)."""
        if mode:
            drop_packed_copies(self)
            drop_compiled_step(self)
        return super().train(mode)

    def assemble_output(
        self,
        hidden_BSD: torch.Tensor,
        stacks: list[tuple[str, StackOutput]],
        labels: torch.Tensor | None,
        *,
        encoder_hidden_states: torch.Tensor | None = None,
        cache: DecoderCache | None = None,
        return_logits: bool = True,
    ) -> ModelOutput:
        logits = self.logits(hidden_BSD) if return_logits else None
        router = [LayerRouting(f"{name}.{index}", moe) for name, stack in stacks for index, moe in stack.moe_outputs]
        moe = self.config.moe
        coefficients = (moe.load_balancing_loss_coef, moe.z_loss_coef) if moe is not None else (0.0, 0.0)
        ce = num_labels = None
        if labels is not None:
            if logits is None:  # no logits wanted: the loss and its gradient without a [B, S, V] tensor
                ce, num_labels = fused_token_cross_entropy(*self.vocab_projection(hidden_BSD), labels)
            else:
                ce, num_labels = token_cross_entropy(logits, labels)
        output = ModelOutput(
            logits=logits,
            loss=None,  # ce_loss + aux_loss, below
            ce_loss=ce,
            num_label_tokens=num_labels,
            router=router,
            hidden_states=hidden_BSD,
            encoder_hidden_states=encoder_hidden_states,
            cache=cache,
            aux_coefficients=coefficients,
        )
        if ce is not None:
            output.loss = ce + output.aux_loss
        return output


def cast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast ``model``'s floating-point weights to ``dtype`` in place, except the routers', which stay float32.

    Selective precision (paper, section 2.4): the router's softmax and top-1 choice are what a low precision
    destabilises, and its weights are a few thousand numbers per layer, so they keep full precision while the rest
    (the bytes a decoding step reads) halves in bf16. Returns ``model``.
    """
    for module in model.modules():
        target = torch.float32 if isinstance(module, Router) else dtype
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != target:
                param.data = param.data.to(target)
    return model


def token_cross_entropy(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over labels that are not ``IGNORE_INDEX`` (computed in float32), and their count."""
    total = F.cross_entropy(
        logits_BSV.float().reshape(-1, logits_BSV.shape[-1]),
        labels_BS.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return _per_label(total, labels_BS)


def fused_token_cross_entropy(
    input_BSD: torch.Tensor, weight_VD: torch.Tensor, labels_BS: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_cross_entropy` of ``F.linear(input, weight)``, chunk by chunk (``linear_cross_entropy``)."""
    total = linear_cross_entropy(
        input_BSD.reshape(-1, input_BSD.shape[-1]), weight_VD, labels_BS.reshape(-1), ignore_index=IGNORE_INDEX
    )
    return _per_label(total, labels_BS)


def _per_label(total: torch.Tensor, labels_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A summed loss as a mean over the labels that count, and their count."""
    count = (labels_BS != IGNORE_INDEX).sum()
    return total / count.clamp(min=1), count
