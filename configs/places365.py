"""
Fine-tune an ImageNet ViT-B/16 (configs/imagenet.py) on Places365 (small, 256x256 images, 365 scene
classes) for 5 epochs, batch 64, as in Reid et al. (ICLR 2025). Start from the same variant's checkpoint:

    torchrun --standalone --nproc_per_node=8 train.py configs/places365.py --attn=grf \
        --init_from=out/imagenet-grf/ckpt.pt --data_dir=/data/places365

Expected top-1 (%), as published: softmax 56.7, toeplitz 55.0, topo 55.1, grf 54.8, linear 54.3.
1,803,460 training images, 28,179 steps per epoch; about 40 min per epoch on 8 A100s.
The head is re-initialised (365 classes); the GRF settings differ from ImageNet's, so the mask
parameters and walks start afresh (f_k = 0.5^k) while every shared weight is loaded.
"""
dataset = 'places365'
data_dir = 'data/places365'  # torchvision Places365 (small): downloaded there if absent (28 GB)
init_from = 'out/imagenet-softmax/ckpt.pt'  # pass the variant's own checkpoint with --init_from
num_workers = 12
image_size = 224
patch_size = 16
dim = 768
depth = 12
heads = 12
mlp_dim = 3072
dropout = 0.0
epochs = 5
batch_size = 64
lr = 1e-4                  # fine-tuning: a much smaller peak than pre-training's 3e-3
min_lr = 1e-6
warmup_steps = 500
weight_decay = 0.05
grad_clip = 1.0
grf_walks = 20             # GRF n = 20, p_halt = 0.1, K = 10 (the paper's fine-tuning settings)
grf_p_halt = 0.1
mask_max_len = 10
log_interval = 200
