"""
A timm VisionTransformer read for model.ViT.from_timm: its settings (as ViTConfig's), refused in one line where it has a
feature that the ViT does not carry, and its weights under the ViT's names. timm is an optional dependency
(pip install timm): it is imported here, inside the functions, so that training from scratch never needs it.
"""
import os

import torch
import torch.nn as nn

# the ViTConfig settings that a timm ViT's weights fix; a caller of from_timm chooses the others (attn, image_size, ...)
FIXED = ('patch_size', 'dim', 'depth', 'heads', 'mlp_dim', 'class_token', 'pool', 'pos_embed_class', 'norm_eps',
         'qkv_bias', 'fc_norm', 'layer_scale')
# timm's state_dict names -> the ViT's (timm's fc_norm is the ViT's norm, placed after the pooling by fc_norm=True)
NAMES = (('patch_embed.proj.', 'patch_embed.'), ('.mlp.fc1.', '.mlp.0.'), ('.mlp.fc2.', '.mlp.3.'), ('fc_norm.', 'norm.'),
         ('.ls1.gamma', '.ls1'), ('.ls2.gamma', '.ls2'))

def create(name, file=''):
    """The timm model `name` with its pretrained weights, which timm fetches into its cache, or reads from file (a local
    copy in any format timm reads: .npz from google-research, .pth, .safetensors). ImportError without timm."""
    import timm
    if file and not os.path.isfile(file):  # timm's own error says nothing
        raise FileNotFoundError(f"no file {file}")
    overlay = {'file': file, 'custom_load': file.endswith('.npz')}  # .npz: timm's reader of google-research checkpoints
    return timm.create_model(name, pretrained=True, **({'pretrained_cfg_overlay': overlay} if file else {}))

def settings(vit):
    """The ViTConfig settings (softmax, no dropout) of the timm VisionTransformer vit, or a ValueError naming the first
    feature it has that the ViT does not carry: register tokens, 'map' pooling, qk-norm, another activation, ..."""
    from timm.layers import Attention, DropPath, LayerNorm, LayerScale, Mlp, PatchEmbed, activations
    from timm.models.vision_transformer import Block, VisionTransformer
    carried = {VisionTransformer, PatchEmbed, Block, Attention, Mlp, LayerScale, LayerNorm, nn.LayerNorm, nn.Linear,
               nn.Conv2d, nn.GELU, activations.GELU, nn.Dropout, DropPath, nn.Identity, nn.Sequential}
    has = lambda name: any(n.endswith(name) and not isinstance(m, nn.Identity) for n, m in vit.named_modules())
    pe, b = vit.patch_embed, vit.blocks[0]
    features = [  # (the feature, whether vit has it)
        ("register tokens", vit.num_reg_tokens > 0),
        (f"global_pool={vit.global_pool!r} (token and avg are carried)", vit.global_pool not in ('token', 'avg')),
        ("pool_include_prefix=True", vit.pool_include_prefix),
        ("no position embedding", vit.pos_embed is None),
        ("qk-norm", has('q_norm') or has('k_norm')),
        ("scale_attn_norm", has('attn.norm')),
        ("scale_mlp_norm", has('mlp.norm')),
        ("pre_norm", has('norm_pre')),
        ("a norm in the patch embedding", has('patch_embed.norm')),
        ("gated attention", has('attn.gate')),
        ("the activation GELU(approximate='tanh')", any(getattr(m, 'approximate', 'none') != 'none' for m in vit.modules())),
        ("final_norm=False", isinstance(vit.norm, nn.Identity) and isinstance(vit.fc_norm, nn.Identity)),
        ("non-square images or patches", pe.img_size[0] != pe.img_size[1] or pe.patch_size[0] != pe.patch_size[1]),
        ("LayerNorms of different eps", len({m.eps for m in vit.modules() if isinstance(m, nn.LayerNorm)}) > 1),
        *((f"{kind.__name__} layers", True) for kind in sorted({type(m) for m in vit.modules()} - carried, key=str))]
    refused = [feature for feature, present in features if present]
    if refused:
        raise ValueError(f"the timm model has {refused[0]}, which this ViT does not carry")
    return dict(image_size=pe.img_size[0], patch_size=pe.patch_size[0], in_channels=pe.proj.in_channels,
                num_classes=vit.num_classes, dim=vit.embed_dim, depth=len(vit.blocks), heads=b.attn.num_heads,
                mlp_dim=b.mlp.fc1.out_features, dropout=0.0, class_token=vit.has_class_token,
                pool='token' if vit.global_pool == 'token' else 'mean', pos_embed_class=not vit.no_embed_class,
                norm_eps=b.norm1.eps, qkv_bias=b.attn.qkv.bias is not None,
                fc_norm=not isinstance(vit.fc_norm, nn.Identity), layer_scale=getattr(b.ls1, 'init_values', 0.0))

def state_dict(vit):
    """vit's tensors under the ViT's names (NAMES)."""
    def renamed(key):
        for old, new in NAMES:
            key = key.replace(old, new)
        return key
    return {renamed(k): v for k, v in vit.state_dict().items()}

def refold(state, vit, inputs=None):
    """(state, the ViT's tensors of vit, with its patch embedding refolded; what was: '' or a line). inputs: the (mean, std)
    per channel of the normalisation the ViT's images will have (data.py's); where vit's own (its pretrained_cfg's) differs,
    the patch embedding is refolded to compute on those images what vit computes on its own, exactly: a channel normalised
    by (m, s) is x = (r - m) / s, vit's own is (r - m') / s' = x s / s' + (m - m') / s', which a weight times s / s'
    and a bias plus the weight's sum times (m - m') / s' give (the patch convolution has no padding)."""
    cfg = getattr(vit, 'pretrained_cfg', None) or {}
    own = tuple(tuple(map(float, cfg.get(k) or ())) for k in ('mean', 'std'))
    if not inputs or not own[0] or own == tuple(tuple(map(float, t)) for t in inputs):
        return state, ''
    if 'patch_embed.bias' not in state:
        raise ValueError("the timm model's patch embedding has no bias, into which its input normalisation would be folded")
    (m, s), (m_own, s_own) = (torch.tensor(t, dtype=torch.float64)[:, None, None] for t in inputs), \
        (torch.tensor(t, dtype=torch.float64)[:, None, None] for t in own)
    w, b = state['patch_embed.weight'], state['patch_embed.bias']
    state = state | {'patch_embed.weight': (w.double() * (s / s_own)).to(w.dtype),
                     'patch_embed.bias': (b.double() + (w.double() * ((m - m_own) / s_own)).sum((1, 2, 3))).to(b.dtype)}
    return state, f"the timm model's input normalisation (mean {own[0]}, std {own[1]}) folded into patch_embed"
