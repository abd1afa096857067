"""
Fine-tune an ImageNet ViT-B/16 (configs/imagenet.py) on Places365 (small, 256x256 images, 365 scene
classes) with the fine-tuning recipe of configs/inat2021.py (5 epochs, batch 64, as in Reid et al., ICLR 2025),
starting from the same variant's checkpoint:

    torchrun --standalone --nproc_per_node=8 train.py configs/places365.py --attn=grf --data_dir=/data/places365

Expected top-1 (%), as published: softmax 56.7, toeplitz 55.0, topo 55.1, grf 54.8, linear 54.3.
1,803,460 training images, 28,179 steps per epoch; about 40 min per epoch on 8 A100s.
The head starts afresh (365 classes); the masks carry over as configs/inat2021.py says.
"""
import os
exec(open(os.path.join(os.path.dirname(__file__), 'inat2021.py')).read())  # the fine-tuning recipe as it is, then:
# what differs from configs/inat2021.py
dataset = 'places365'
published = 'softmax:56.7,toeplitz:55.0,topo:55.1,grf:54.8,linear:54.3'  # the paper, fine-tuned from ImageNet
data_dir = 'data/places365'  # torchvision Places365 (small): downloaded there if absent (28 GB)
