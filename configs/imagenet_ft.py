"""
ImageNet-1k fine-tuned from an ImageNet-21k ViT-B/16 (timm's vit_base_patch16_224.augreg_in21k, Steiner et al., "How to
train your ViT?", 2021) into each variant: its softmax weights are the start, the attention becomes the variant's (masks
start as configured, the 1000-class head afresh). This asks how well a mask lets linear attention take over a trained
softmax model, not the paper's from-scratch question (configs/imagenet.py); no published figure exists for it.

    pip install timm    # the weights download into timm's cache; --init_file=PATH reads a local copy instead
    torchrun --standalone --nproc_per_node=8 train.py configs/imagenet_ft.py --attn=grf --data_dir=/data/imagenet

The recipe, and why: 10 epochs, a little more than the ~8 (20k steps at batch 512) in which Steiner et al. fine-tune
softmax from 21k, as here the attention itself changes. AdamW at batch 512, lr 1e-4: a fifth of DeiT's from-scratch peak
(5e-4 per 512 images) for a trained start (Steiner et al. fine-tune with SGD, which train.py does not offer); one epoch
of warm-up, then cosine to 1e-6, so that the new head and the new token mixing do not wreck the trained weights in the
first steps; weight decay 0.05 and label smoothing 0.1 as DeiT; no dropout. GRF n = 20, p_halt 0.1, K = 10 and
f_k = 0.5^k: the paper's settings for its fine-tuning runs; the masks learn at 10x the rate (mask_lr_mult).
The 21k model saw inputs normalised by mean 0.5, std 0.5; data.py normalises by ImageNet's mean and std: from_timm
folds that per-channel change into the patch embedding, exactly, so the converted model sees what the 21k model saw.
Cost, not yet measured on a GPU: about 100 GFLOP per image forward and backward (configs/imagenet.py), so at 40% of an
H100's bf16 peak about 4,000 images/s per GPU and 10 x 1,281,167 images in 0.9 GPU-hours per variant; check_gpu.py
measures the compiled images/s of each variant, and GPU-hours = 10 x 1,281,167 / (images/s) / 3,600. JPEG decoding
(~180 images/s per worker) sets the pace unless some 20 workers feed each GPU.
"""
dataset = 'imagenet'
data_dir = 'data/imagenet'
out_dir = 'out/imagenet_ft-{attn}'
init_from = 'timm:vit_base_patch16_224.augreg_in21k'  # its weights fix the architecture: ViT-B/16, class token, eps 1e-6
num_workers = 16           # per GPU: decoding is the bottleneck (README, "Getting the data")
image_size = 224           # the 21k model's; another size resamples the position embeddings as timm does
dropout = 0.0
epochs = 10
batch_size = 512           # global: 64 per GPU on 8 GPUs
lr = 1e-4
min_lr = 1e-6
warmup_steps = 2500        # one epoch at batch 512
weight_decay = 0.05
label_smoothing = 0.1
grad_clip = 1.0
loss = 'softmax'
grf_walks = 20             # the paper's fine-tuning settings
grf_p_halt = 0.1
mask_max_len = 10
mask_init_decay = 0.5
log_interval = 100
ckpt_interval = 2500
