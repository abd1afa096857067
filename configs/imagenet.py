"""
ViT-B/16 on ImageNet-1k from scratch, the setup of Reid et al., "Linear Transformer Topological Masking
with Graph Random Features" (ICLR 2025, arXiv 2410.03462): 90 epochs, global batch 4096, Adam-style
lr 3e-3 with 10^4 warm-up steps and cosine decay to 1e-5.

    torchrun --standalone --nproc_per_node=8 train.py configs/imagenet.py --attn=grf --data_dir=/data/imagenet

Expected top-1 (%) after 90 epochs, as published: softmax 74.1, topo 74.1, toeplitz 73.3, grf 73.0, linear 69.3.
Run time: 90 x 1,281,167 = 115M images at ~53 GFLOP each (forward + backward) = 6e18 FLOP; at 40% of
bf16 peak on 8 H100s (~3 PFLOP/s) about 35 min of arithmetic, in practice 2-4 h on 8 A100/H100 because
JPEG decoding (~100 CPU cores for 10k images/s) sets the pace. 312 steps per epoch, 28,080 in all.
Data layout: data_dir/train/<wnid>/*.JPEG and data_dir/val/<wnid>/*.JPEG (see README.md).
"""
dataset = 'imagenet'
data_dir = 'data/imagenet'
num_workers = 12           # per GPU
image_size = 224
patch_size = 16            # 14 x 14 = 196 tokens
dim = 768                  # ViT-B: 12 layers, 12 heads, width 768, MLP 3072
depth = 12
heads = 12
mlp_dim = 3072
dropout = 0.1              # the original ViT's ImageNet-from-scratch regularisation
epochs = 90
batch_size = 4096          # global: 512 per GPU on 8 GPUs; raise grad_accum if that does not fit
grad_accum = 1
lr = 3e-3
min_lr = 1e-5
warmup_steps = 10_000
weight_decay = 0.1         # the paper says Adam; decoupled decay 0.1 on matrices is our choice
grad_clip = 1.0
label_smoothing = 0.0
grf_walks = 100            # GRF n = 100, p_halt = 0.1, K = 100 (the paper's ImageNet settings)
grf_p_halt = 0.1
mask_max_len = 100
compile = True
log_interval = 50
