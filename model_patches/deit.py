"""DeiT encoders: blocks in ``deit.layers``, attention ``DeiTLayer.attention``. The embeddings put the CLS
token at index 0 and the distillation token at index 1: both are protected, and both rank the other
tokens (their attention rows are averaged). ``DeiTForImageClassificationWithTeacher`` averages the heads
on the two tokens, which therefore stay at indices 0 and 1.

Pre-norm block, as ViT: reducers act between attention (``layernorm_after`` input) and MLP.
"""

from . import register_adapter
from .encoder import EncoderAdapter

register_adapter(
    EncoderAdapter(
        name="deit",
        kind="encoder",
        match=("deit",),
        layers="layers",
        attention="attention",
        protected_tokens=2,
        class_tokens=2,
        mlp_input="layernorm_after",
        mlp_output="mlp",
        pooling="cls",
        examples=("DeiTModel", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"),
    )
)
