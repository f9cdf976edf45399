"""Every method, one file each; importing this package registers them all."""

from .diffusion import (
    dydit,  # noqa: F401
    freqts,  # noqa: F401
    todo,  # noqa: F401
    tome_sd,  # noqa: F401
)
from .encoder import (
    atc,  # noqa: F401
    ats,  # noqa: F401
    avit,  # noqa: F401
    diffrate,  # noqa: F401
    dynamicvit,  # noqa: F401
    evit,  # noqa: F401
    evo_vit,  # noqa: F401
    ia_red2,  # noqa: F401
    madtp,  # noqa: F401
    spvit,  # noqa: F401
    stvit,  # noqa: F401
    testa,  # noqa: F401
    tocom,  # noqa: F401
    tokenlearner,  # noqa: F401
    tome,  # noqa: F401
    tps,  # noqa: F401
    zero_tprune,  # noqa: F401
)
from .kv import (
    fastgen,  # noqa: F401
    h2o,  # noqa: F401
    keydiff,  # noqa: F401
    kivi,  # noqa: F401
    kvquant,  # noqa: F401
    minicache,  # noqa: F401
    pyramidkv,  # noqa: F401
    scissorhands,  # noqa: F401
    snapkv,  # noqa: F401
    streamingllm,  # noqa: F401
    tova,  # noqa: F401
)
from .lm import (
    dcp,  # noqa: F401
    eagle,  # noqa: F401
    gist,  # noqa: F401
    icae,  # noqa: F401
)
from .nlp import (
    mrt5,  # noqa: F401
    token_dropping,  # noqa: F401
    token_pooling,  # noqa: F401
    tokenskip,  # noqa: F401
)
from .prompt import (
    lazyllm,  # noqa: F401
    llmlingua,  # noqa: F401
    llmlingua2,  # noqa: F401
    longllmlingua,  # noqa: F401
)
from .ssm import (
    ssm_prune,  # noqa: F401
)
from .vlm import (
    atp_llava,  # noqa: F401
    dynamic_llava,  # noqa: F401
    fastv,  # noqa: F401
    ivtp,  # noqa: F401
    prumerge,  # noqa: F401
    sparsevlm,  # noqa: F401
    turbo,  # noqa: F401
    visionzip,  # noqa: F401
)
