"""ViT.from_timm against timm itself (its models with random weights, offline) and train.py's --init_from=timm:NAME. The
class token's place in the masks is tested in test_model.py, which needs no timm."""
import functools
import json
import os
import subprocess
import sys

import numpy
import pytest
import torch
import torch.nn.functional as F

import data
from model import VARIANTS, ViT, ViTConfig
from test_data import need

timm = pytest.importorskip('timm')
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))

def random_timm(name_or_kw, **kw):
    """A timm model (a name, or VisionTransformer's arguments) in eval mode, every weight moved off its initialisation:
    LayerScale's 1e-6 gains, the class token's 1e-6 and the norms' ones would hide a fault."""
    torch.manual_seed(0)
    vit = timm.create_model(name_or_kw, pretrained=False, **kw) if isinstance(name_or_kw, str) else VisionTransformer(**name_or_kw)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vit.eval()

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)  # VisionTransformer's arguments

@pytest.mark.parametrize('name, kw', [
    ('vit_tiny_patch16_224', {}),                  # class token, pooled by it, eps 1e-6
    ('deit_tiny_patch16_224', {}),
    ('vit_tiny_patch16_384', {}),
    ('vit_medium_patch16_gap_240', {}),            # no class token, mean pooling, no qkv bias, LayerScale
    ('deit3_small_patch16_224', {}),               # no position for the class token (no_embed_class), LayerScale
    ('vit_tiny_patch16_224', dict(class_token=False, global_pool='avg', fc_norm=True)),  # the norm after the pooling
    ('vit_tiny_patch16_224', dict(global_pool='avg')),                                   # class token, patches' mean
])
def test_softmax_vit_gives_timms_logits(name, kw):
    vit = random_timm(name, **kw)
    model, done = ViT.from_timm(vit)
    model.eval()
    size = vit.patch_embed.img_size[0]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = vit(x), model(x)
    assert want.shape == got.shape and want.std() > 0.1
    assert (got - want).abs().max() < 1e-5, (got - want).abs().max()
    assert len(done['loaded']) == len(vit.state_dict()) and done['fresh'] == done['resampled'] == []
    assert model.config.norm_eps == 1e-6 and all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))

@pytest.mark.parametrize('name, folded', [('vit_tiny_patch16_224.augreg_in21k', True), ('deit_tiny_patch16_224', False)])
def test_a_model_normalised_otherwise_sees_on_this_repositorys_images_what_it_saw_on_its_own(name, folded):
    """augreg's ViTs take pixels normalised by mean = std = 0.5, data.py gives ImageNet's statistics: raw pixels r, timm's
    model on its own normalisation against the ViT on data.py's. A DeiT shares data.py's: nothing refolded."""
    vit = random_timm(name)
    r = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    own, ours = ((r - torch.tensor(m)[:, None, None]) / torch.tensor(s)[:, None, None]
                 for m, s in ((vit.pretrained_cfg['mean'], vit.pretrained_cfg['std']), data.IMAGENET_STATS))
    model, done = ViT.from_timm(vit, inputs=data.IMAGENET_STATS)
    unfolded, _ = ViT.from_timm(vit)
    with torch.no_grad():
        want, got, plain = vit(own), model.eval()(ours), unfolded.eval()(ours)
    assert (got - want).abs().max() < 1e-5, (got - want).abs().max()
    assert ('mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5)' in done['refolded']) == folded
    assert ((plain - want).abs().max() > 0.1) == folded  # the images differ: without the fold the logits would

@pytest.mark.parametrize('kw, size', [({}, 160), ({}, 320), (dict(no_embed_class=True), 160),
                                      (dict(class_token=False, global_pool='avg'), 288)])
def test_another_image_size_resamples_the_position_embeddings_as_timm_does(kw, size):
    """The same tensor as timm's resample_abs_pos_embed, and the logits of timm's own model set to that size."""
    vit = random_timm('vit_tiny_patch16_224', **kw)
    model, done = ViT.from_timm(vit, image_size=size)
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    want = timm.layers.resample_abs_pos_embed(vit.pos_embed.detach(), (size // 16, size // 16), num_prefix_tokens=prefix)
    assert done['resampled'] == ['pos_embed'] and torch.equal(model.pos_embed.detach(), want)
    vit.set_input_size(img_size=size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model.eval()(x) - vit(x)).abs().max() < 1e-5

@pytest.mark.parametrize('kw, feature', [
    (dict(reg_tokens=4), "register tokens"),
    (dict(global_pool='map'), "global_pool='map'"),
    (dict(global_pool='max'), "global_pool='max'"),
    (dict(global_pool='avg', pool_include_prefix=True), "pool_include_prefix"),
    (dict(qk_norm=True), "qk-norm"),
    (dict(scale_attn_norm=True), "scale_attn_norm"),
    (dict(scale_mlp_norm=True), "scale_mlp_norm"),
    (dict(pre_norm=True), "pre_norm"),
    (dict(final_norm=False), "final_norm=False"),
    (dict(pos_embed='none'), "no position embedding"),
    (dict(embed_norm_layer='layernorm'), "a norm in the patch embedding"),
    (dict(act_layer='gelu_tanh'), "GELUTanh layers"),
    (dict(act_layer=functools.partial(torch.nn.GELU, approximate='tanh')), "the activation GELU(approximate='tanh')"),
    (dict(act_layer='quick_gelu'), "QuickGELU layers"),
    (dict(norm_layer='rmsnorm'), "RmsNorm layers"),
    (dict(mlp_layer=timm.layers.SwiGLUPacked, mlp_ratio=2), "GluMlp layers"),
    (dict(block_fn=timm.models.vision_transformer.ResPostBlock), "ResPostBlock layers"),
    (dict(img_size=(32, 48)), "non-square"),
])
def test_each_feature_this_vit_does_not_carry_is_refused_by_name(kw, feature):
    vit = random_timm({**TINY, **kw})
    with pytest.raises(ValueError, match='^the timm model has .*which this ViT does not carry$') as e:
        ViT.from_timm(vit)
    assert feature in str(e.value) and '\n' not in str(e.value)

def test_a_distilled_deit_and_settings_the_weights_fix_are_refused():
    vit = timm.create_model('deit_tiny_distilled_patch16_224', pretrained=False)
    with pytest.raises(ValueError, match='VisionTransformerDistilled layers'):
        ViT.from_timm(vit)
    with pytest.raises(ValueError, match="^dim=64, class_token=False differ from the timm model's"):
        ViT.from_timm(random_timm(TINY), dim=64, class_token=False, depth=2)

@pytest.mark.parametrize('attn', [a for a in VARIANTS if a != 'softmax'])
def test_masked_variants_take_every_shared_weight_and_start_their_masks_as_configured(attn):
    vit = random_timm({**TINY, 'global_pool': 'avg', 'init_values': 0.1})
    settings = dict(attn=attn, grf_walks=4, mask_max_len=3, mask_init_decay=0.7, table_init_decay=0.8)
    model, done = ViT.from_timm(vit, **settings)
    fresh = ViT(ViTConfig(**{**vars(model.config)}))  # the same settings, initialised from scratch
    mask, walks = set(model.mask_parameters()), set(model.walk_buffers())
    assert set(done['loaded']) == set(model.state_dict()) - mask - walks and len(done['loaded']) == len(vit.state_dict())
    assert set(done['fresh']) == mask and set(done['drawn']) == walks
    assert all(torch.equal(model.state_dict()[k], fresh.state_dict()[k]) for k in mask | walks)
    assert torch.equal(model.blocks[1].mlp[3].weight, vit.blocks[1].mlp.fc2.weight)
    assert torch.equal(model.blocks[1].ls2, vit.blocks[1].ls2.gamma)

def train(*args, ok=True, env=None):
    p = subprocess.run([sys.executable, 'train.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, **(env or {})})
    if ok:
        assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p

def test_init_file_as_pth_or_safetensors_gives_the_model_of_the_timm_model_itself_and_npz_goes_to_timms_jax_reader(tmp_path):
    from safetensors.torch import save_file
    vit = random_timm('vit_tiny_patch16_224')
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    torch.save(state, tmp_path / 'w.pth')
    save_file(state, tmp_path / 'w.safetensors')
    want = ViT.from_timm(vit)[0].state_dict()
    for path in (tmp_path / 'w.pth', tmp_path / 'w.safetensors'):
        got = ViT.from_timm('vit_tiny_patch16_224', file=str(path))[0].state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), path
    numpy.savez(tmp_path / 'w.npz', unrelated=numpy.zeros(1))  # .npz goes to timm's reader of google-research checkpoints
    with pytest.raises(ValueError, match='JAX/Flax'):
        ViT.from_timm('vit_tiny_patch16_224', file=str(tmp_path / 'w.npz'))

def test_train_evaluates_a_timm_model_from_init_file_and_fine_tunes_it(tmp_path):
    """eval_only: the same figures from .pth and .safetensors, and those of the converted model evaluated here; a short
    fine-tuning run saves a checkpoint of the class-token model that evaluates to its recorded top-1."""
    from safetensors.torch import save_file
    root = need('imagenette-mini')
    vit = random_timm('vit_tiny_patch16_224')
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    torch.save(state, tmp_path / 'w.pth')
    save_file(state, tmp_path / 'w.safetensors')
    common = ['--dataset=imagenet', f'--data_dir={root}', '--image_size=32', '--num_workers=0', '--batch_size=50',
              '--device=cpu', '--attn=toeplitz', '--init_from=timm:vit_tiny_patch16_224']
    evals = [json.loads(train(*common, f'--init_file={tmp_path / f}', '--eval_only=True', f'--out_dir={tmp_path / f}-eval')
                        .stdout.strip().splitlines()[-1]) for f in ('w.pth', 'w.safetensors')]
    assert evals[0] == evals[1] and evals[0]['count'] == 200
    with open(tmp_path / 'w.pth-eval' / 'eval.json') as f:  # in out_dir: a timm model has no checkpoint folder
        assert json.load(f)['top1'] == evals[0]['top1']
    out = str(tmp_path / 'run')
    p = train(*common, f'--init_file={tmp_path / "w.pth"}', '--epochs=1', '--max_steps=2', f'--out_dir={out}')
    assert "fine-tuning from timm:vit_tiny_patch16_224 (attn=softmax; this run: toeplitz)" in p.stdout
    assert "resampled from 224 to 32 px: ['pos_embed']" in p.stdout
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), map_location='cpu', weights_only=True)
    assert ckpt['config']['class_token'] and ckpt['config']['dim'] == 192 and ckpt['config']['norm_eps'] == 1e-6
    again = train(*common[:-1], '--init_from=resume', '--eval_only=True', f'--out_dir={out}').stdout.strip().splitlines()[-1]
    with open(os.path.join(out, 'result.json')) as f:
        assert json.loads(again)['top1'] == json.load(f)['final']['top1']

def test_without_timm_train_says_how_to_install_it(tmp_path):
    (tmp_path / 'timm').mkdir()
    (tmp_path / 'timm' / '__init__.py').write_text("raise ImportError(\"No module named 'timm'\")\n")
    p = train('--dataset=synthetic', '--device=cpu', '--init_from=timm:vit_tiny_patch16_224', '--eval_only=True', ok=False,
              env={'PYTHONPATH': str(tmp_path)})
    assert p.returncode == 2 and p.stderr.strip().count('\n') == 0 and 'pip install timm' in p.stderr, p.stderr
