"""State-space models (kind ``"ssm"``): transformers' Mamba and Mamba-2.

Their blocks (``layers``) each hold one ``mixer`` (the selective-scan layer) behind a pre-norm residual; a block
is called as ``block(hidden_states, cache_params=..., attention_mask=...)`` (``cache=`` from transformers 5.24)
and the model has no attention, so the adapters say ``uses_attention_interface=False`` (``apply`` leaves the
attention implementation alone). The ``ssm_prune`` wiring (``hf_tokred.integration.ssm``) reads nothing else from
them.

Example:
    >>> from transformers import MambaConfig, MambaModel
    >>> from hf_tokred.model_patches import find_adapter
    >>> find_adapter(MambaModel(MambaConfig(vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=2))).kind
    'ssm'
"""

from __future__ import annotations

from dataclasses import dataclass

from . import ModelAdapter, register_adapter


@dataclass(frozen=True)
class SSMAdapter(ModelAdapter):
    """:class:`ModelAdapter` of a state-space language model.

    Attributes (besides those of :class:`ModelAdapter`):
        uses_attention_interface: always False: the blocks have no attention for ``apply`` to re-route.
    """

    uses_attention_interface: bool = False


MAMBA = register_adapter(SSMAdapter(
    name="mamba", kind="ssm", match=("mamba",), layers="layers", attention="mixer",
    examples=("MambaModel", "MambaForCausalLM"),
))
MAMBA2 = register_adapter(SSMAdapter(
    name="mamba2", kind="ssm", match=("mamba2",), layers="layers", attention="mixer",
    examples=("Mamba2Model", "Mamba2ForCausalLM"),
))
