"""TokenLearner on the image path with random weights: distill the maps (backbone frozen), held-out cosine to dense."""
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import ViTConfig, ViTModel

import hf_tokred
from hf_tokred.recipes.tokenlearner import train_tokenlearner


def vit():
    torch.manual_seed(0)
    c = ViTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768)
    c._attn_implementation = "sdpa"
    return ViTModel(c, add_pooling_layer=False).eval()

g = torch.Generator().manual_seed(0)
# smooth random "images" (low-frequency noise upsampled) so neighbouring patches correlate, as in real images
def images(n):
    return torch.nn.functional.interpolate(torch.randn(n, 3, 14, 14, generator=g), size=224, mode="bilinear")
train = [{"pixel_values": images(8)} for _ in range(12)]
test = [{"pixel_values": images(8)} for _ in range(6)]
teacher = vit()
def run(model):
    outs, flops = [], 0
    with torch.inference_mode():
        for b in test:
            with FlopCounterMode(display=False) as c:
                outs.append(model(**b).last_hidden_state)
            flops += c.get_total_flops()
    return outs, flops
dense, dflops = run(teacher)
cos = torch.nn.functional.cosine_similarity
for params in [{"num_tokens": 8, "layer": 3}, {"num_tokens": 16, "layer": 3}, {"num_tokens": 16, "layer": 2},
               {"num_tokens": 16, "layer": 3, "fuse": True}]:
    model = vit()
    hf_tokred.apply(model, {"method": "tokenlearner", **params})
    before, _ = run(model)
    t = time.time()
    losses = train_tokenlearner(model, train, teacher=teacher, steps=150, lr=3e-3, shuffle=True, progress=False)
    wall = time.time() - t
    outs, flops = run(model)
    def stats(o):
        mean = torch.cat([cos(a.mean(1), b.mean(1), dim=-1) for a, b in zip(o, dense)]).mean().item()
        cls = torch.cat([cos(a[:, 0], b[:, 0], dim=-1) for a, b in zip(o, dense)]).mean().item()
        return mean, cls
    print(params, f"FLOPs saved {100*(1-flops/dflops):.1f}%", "untrained mean/cls cos {:.4f}/{:.4f}".format(*stats(before)),
          "trained {:.4f}/{:.4f}".format(*stats(outs)), f"loss {losses[0]:.4f}->{losses[-1]:.4f}", f"train {wall:.0f}s", flush=True)
